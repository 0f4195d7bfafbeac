import numpy as np

from nmm.data.curate import content_ids, split
from nmm.data.sequences import INSTRUCTIONS, Prompts, instruction_texts, pack_rows
from nmm.data.sources import digit_captions, load_digits, parse_digit
from nmm.tokenizers import ColourMaskVQ, PatchVQ, SharedVocab, TextTokenizer, load_image_tokenizer
from nmm.tokenizers.vocab import ASSISTANT, BOI, BOS, EOI, EOS, PAD, USER, blank_text
from nmm.train.recipes import RECIPES


def test_bpe_round_trips_captions_and_is_smaller_than_bytes():
    texts = [c for y in range(10) for c in digit_captions(y, bytes([y]), 4)]
    tok = TextTokenizer.train("bpe", texts, 64)
    for t in texts:
        assert tok.decode(tok.encode(t)) == t
    assert len(tok.encode(texts[0])) < len(texts[0].encode())
    again = TextTokenizer.from_bytes(tok.to_bytes())
    assert again.encode(texts[3]) == tok.encode(texts[3])


def test_patch_vq_fits_train_only_and_round_trips_through_bytes():
    rng = np.random.default_rng(0)
    images = rng.random((50, 8, 8, 1), dtype=np.float32)
    vq = PatchVQ.fit(images, 2, 16, seed=0)
    codes = vq.encode(images)
    assert codes.shape == (50, 16) and codes.max() < 16
    recon = vq.decode(codes)
    assert recon.shape == images.shape
    again = PatchVQ.from_bytes(vq.to_bytes())
    assert np.array_equal(again.encode(images), codes)
    assert again.image_shape == (8, 8, 1)


def test_patch_vq_bytes_are_the_same_in_every_process_and_old_files_still_load():
    """A dataset's digest covers its tokenizer file: the same codebook must give the same bytes
    in every process. (safetensors writes its metadata map in no fixed order: with two entries,
    two processes wrote two different files about half the time.)"""
    import hashlib
    import json
    import subprocess
    import sys

    code = (
        "import hashlib, numpy as np; from nmm.tokenizers import PatchVQ; "
        "vq = PatchVQ(np.arange(48, dtype=np.float32).reshape(4, 12), 2, (8, 8, 3)); "
        "print(hashlib.sha256(vq.to_bytes()).hexdigest())"
    )
    digests = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        for _ in range(6)
    }
    vq = PatchVQ(np.arange(48, dtype=np.float32).reshape(4, 12), 2, (8, 8, 3))
    assert digests == {hashlib.sha256(vq.to_bytes()).hexdigest() + "\n"}

    from safetensors.numpy import save

    old = save(
        {"codebook": vq.codebook}, metadata={"patch": "2", "image_shape": json.dumps([8, 8, 3])}
    )  # nmm 0.1.0's layout
    back = PatchVQ.from_bytes(old)
    assert back.patch == 2 and back.image_shape == (8, 8, 3) and np.array_equal(back.codebook, vq.codebook)


def test_vq_reconstruction_of_digits_stays_close():
    d = load_digits(1)
    vq = PatchVQ.fit(d.images[:800], 2, 32, seed=0)
    err = np.abs(vq.decode(vq.encode(d.images[800:])) - d.images[800:]).mean()
    assert err < 0.08


def test_shared_vocab_ranges_do_not_overlap():
    v = SharedVocab(text_size=40, image_size=32)
    lo_t, hi_t = v.text_range()
    lo_i, hi_i = v.image_range()
    assert {PAD, BOS, EOS, BOI, EOI, USER, ASSISTANT} == set(range(lo_t))
    assert hi_t == lo_i and hi_i == v.size == 7 + 40 + 32
    assert v.text_ids([0, 5, 39]) == [7, 12, 46] and v.text_local(v.text_ids([0, 5, 39])) == [0, 5, 39]


def test_m2t_and_m2g_sequences_mask_only_the_target():
    v = SharedVocab(text_size=10, image_size=8)
    plain = Prompts.of(v, "plain", lambda s: [9])
    codes = np.array([1, 2, 3])
    toks, mask = plain.row(codes, [4, 5], "m2t")
    assert toks[:2] == [BOS, BOI] and toks[-1] == EOS
    assert [t for t, m in zip(toks, mask) if m] == [v.text_offset + 4, v.text_offset + 5, EOS]
    toks, mask = plain.row(codes, [4, 5], "m2g")
    assert [t for t, m in zip(toks, mask) if m] == [v.image_offset + 1, v.image_offset + 2, v.image_offset + 3, EOI]
    tokens, masks = pack_rows([plain.row(codes, [4], "m2t"), plain.row(codes, [4, 5, 6], "m2g")])
    assert tokens.shape == masks.shape and tokens[0, -1] == PAD and masks[0, -1] == 0


def test_instruction_rows_wrap_the_same_answers_in_user_and_assistant_turns():
    texts = ["a handwritten digit 3", "what colour is the square", "red"]
    tok = TextTokenizer.train("bpe", texts + instruction_texts(), 80)
    v = SharedVocab(text_size=tok.size, image_size=8)
    plain, instruct = (Prompts.of(v, s, tok.encode) for s in ("plain", "instruct"))
    codes, cap, q, a = np.array([1, 2, 3]), tok.encode(texts[0]), tok.encode(texts[1]), tok.encode(texts[2])
    for (pt, pm), (it, im) in [
        (plain.row(codes, cap, "m2t"), instruct.row(codes, cap, "m2t")),
        (plain.row(codes, cap, "m2g"), instruct.row(codes, cap, "m2g")),
        (plain.vqa_row(codes, q, a), instruct.vqa_row(codes, q, a)),
    ]:
        answer = [t for t, m in zip(pt, pm) if m]
        assert [t for t, m in zip(it, im) if m] == answer  # the targets do not change
        prompt = it[: im.index(1)]
        assert prompt[:2] == [BOS, USER] and ASSISTANT in prompt and USER not in pt and ASSISTANT not in pt
    # The instruction is real text the tokenizer learned (no <unk>), and it is in the prompt.
    for k, text in enumerate(INSTRUCTIONS["caption"]):
        ids = tok.encode(text)
        assert 0 not in ids and tok.decode(ids) == text
        p = instruct.caption(codes, k)
        assert p[2 : 2 + len(ids)] == v.text_ids(ids) and p[2 + len(ids)] == BOI and p[-2:] == [EOI, ASSISTANT]
    draw, said = instruct.draw(cap, k=1), v.text_ids(tok.encode(INSTRUCTIONS["draw"][1]))
    assert draw[-2:] == [ASSISTANT, BOI] and draw[2 : 2 + len(said)] == said
    # The unconditional twin of guidance pads every text token out and keeps the turns.
    blank = blank_text(draw, v.text_range())
    assert len(blank) == len(draw) and [t for t in blank if t != PAD] == [BOS, USER, ASSISTANT, BOI]
    styles = {name: r.style for name, r in RECIPES.items()}
    assert styles == {"pretrain": "plain", "sft": "instruct", "opd": "instruct", "grpo": "instruct"}


def test_split_is_content_stable():
    d = load_digits(1)
    a = split(content_ids(d.images), 0.7, 0.1)
    perm = np.random.default_rng(1).permutation(len(d.images))
    b = split(content_ids(d.images[perm]), 0.7, 0.1)
    for name in ("train", "val", "test"):
        assert sorted(perm[b[name]].tolist()) == sorted(a[name].tolist())
    assert not set(a["train"]) & set(a["test"])


def test_parse_digit_reads_numerals_and_words():
    assert parse_digit("a handwritten digit 7") == 7
    assert parse_digit("the number three") == 3
    assert parse_digit("a scanned thing") is None


def _shape_scenes(n: int, seed: int = 0):
    from nmm.data import shapes

    rng, scenes = np.random.default_rng(seed), []
    while len(scenes) < n:
        scene = shapes.make_scene(shapes.TASKS[len(scenes) % len(shapes.TASKS)], rng, 32)
        if scene is not None:
            scenes.append(scene)
    return scenes, np.stack([shapes.render(s.objects, 32) for s in scenes])


def test_colour_mask_vq_draws_a_colour_on_a_shape_it_never_saw_together():
    """Fitted without a single red triangle or blue circle, the colour × mask codebook still
    reconstructs them exactly; a codebook of whole patches of the same size cannot."""
    from nmm.evaluate import shapes_judge

    scenes, images = _shape_scenes(600)
    held = np.array(
        [any((o.colour, o.shape) in {("red", "triangle"), ("blue", "circle")} for o in s.objects) for s in scenes]
    )
    assert 20 < held.sum() < len(scenes) - 100
    vq = ColourMaskVQ.fit(images[~held], 4, 16, 32, seed=0)
    assert vq.factors == (11, len(vq.masks)) and vq.size == 11 * len(vq.masks)  # the ground and ten colours
    codes = vq.encode(images)
    assert codes.shape == (len(images), 64) and codes.max() < vq.size
    assert np.abs(vq.decode(codes) - images).max() < 1e-3
    masks = len(vq.masks)
    assert (codes[codes % masks == 0] == 0).all()  # read: every empty patch is (the ground, the empty mask)
    drawn = vq.drawing_codes(codes)
    assert np.array_equal(vq.decode(drawn), vq.decode(codes)) and np.array_equal(drawn % masks, codes % masks)
    row = np.array([[0, 3 * masks + 1, 0, 0, 5 * masks + 2, 0]])  # empty, colour 3, empty, empty, colour 5, empty
    assert (vq.drawing_codes(row) // masks).tolist() == [[3, 3, 5, 5, 5, 5]]  # the next one's colour, then the last's
    unseen = set(np.unique(codes[held])) - set(np.unique(codes[~held]))
    assert unseen, "held-out scenes should need pairs the training images never showed"
    whole = PatchVQ.fit(images[~held], 4, 128, seed=0)
    held_scenes = [s for s, h in zip(scenes, held) if h]
    assert shapes_judge.evaluate(held_scenes, vq.decode(codes[held]))["overall"] == 1.0
    assert shapes_judge.evaluate(held_scenes, whole.decode(whole.encode(images[held])))["overall"] < 0.8


def test_image_tokenizers_load_by_kind_from_their_bytes():
    _, images = _shape_scenes(60)
    pair = ColourMaskVQ.fit(images, 4, 16, 8, seed=0)
    whole = PatchVQ.fit(images, 4, 16, seed=0)
    again = load_image_tokenizer(pair.to_bytes())
    assert isinstance(again, ColourMaskVQ) and again.factors == pair.factors
    assert np.array_equal(again.encode(images), pair.encode(images))
    assert isinstance(load_image_tokenizer(whole.to_bytes()), PatchVQ) and whole.factors == ()
    blank = np.full((4, 8, 8, 3), 0.5, np.float32)  # nothing but the ground: one colour, the empty mask
    none = ColourMaskVQ.fit(blank, 4, 16, 8)
    assert none.factors == (1, 1) and np.array_equal(none.decode(none.encode(blank)), blank)
