"""kmock's Kubernetes emulator, made to behave like the real API server where kopf and the
official client depend on it (measured gaps of stock kmock 0.8, see shared/TOOLCHAIN.md).

Each override models documented API-server behaviour, nothing the operator merely wishes for:
- server-populated metadata on create: uid, resourceVersion, creationTimestamp, generation=1,
  and a name from generateName;
- resourceVersion bumps on every write; generation bumps only when `spec` changes; a list
  returns the current resourceVersion and a watch from it sends only what changed since;
- a write carrying a stale metadata.resourceVersion is 409 Conflict;
- creating an object whose name is taken is 409 AlreadyExists (kmock replaced the object);
- JSON-patch (a list body) is applied, and a failed `test` op is 422, not 500;
- for resources with a status subresource: PATCH on /status changes only status, PATCH on the
  main resource ignores status;
- deleting an object garbage-collects its dependents (ownerReferences uid), as the GC
  controller does in the background (here: right after the delete, or after the patch that
  removes the last finalizer of an object marked for deletion).

And one that is about the emulator's own speed, not the API's: kmock keeps every request it has
served and matches each new one by scanning that history (`request in view`, by identity), so a
long run slows down quadratically (200 pipelines: 166 s, nearly all of it in kmock's filters).
Only the last HISTORY requests are kept; no test reads older ones.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import secrets
import string
import threading
import uuid

import jsonpatch
import kmock
from kmock._internal import enums, k8s

from tests import merge_patch


def conflict() -> k8s.KubernetesError:
    return k8s.KubernetesError(
        status=409,
        reason="Conflict",
        message="the object has been modified; please apply your changes to the latest version and try again",
    )


def already_exists(plural: str, name: str) -> k8s.KubernetesError:
    return k8s.KubernetesError(status=409, reason="AlreadyExists", message=f'{plural} "{name}" already exists')


def invalid(message: str) -> k8s.KubernetesError:
    return k8s.KubernetesError(status=422, reason="Invalid", message=message)


def _merge_patch_between(old, new):
    """The RFC 7386 merge patch that turns `old` into `new` (None removes a key)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    out = {k: None for k in old if k not in new}
    for k, v in new.items():
        if k not in old:
            out[k] = v
        elif old[k] != v:
            out[k] = _merge_patch_between(old[k], v)
    return out


class RealisticEmulator(kmock.KubernetesEmulator):
    _rv = 999  # the cluster-wide resourceVersion counter
    status_subresources: set = set()
    # Test hook: while set, merge-PATCHes (status/progress; not kopf's JSON-patch of the
    # finalizer) of these plurals wait — to kill an operator between its two writes.
    held_plurals: set = set()
    _released: asyncio.Event | None = None

    # Test hook: the next N creates of a plural fail with 500 (an API server in trouble).
    failing_creates: dict = {}

    def fail_creates(self, plural: str, times: int) -> None:
        self.failing_creates = {plural: times}

    def hold(self, plural: str) -> None:
        self._released = asyncio.Event()
        self.held_plurals = {plural}

    def release(self) -> None:
        self.held_plurals = set()
        if self._released is not None:
            self._released.set()

    HISTORY = 32

    async def __call__(self, raw_request):
        try:
            return await super().__call__(raw_request)
        finally:
            if len(self._requests) > 2 * self.HISTORY:  # (the request being served is the newest: kept)
                del self._requests[: -self.HISTORY]
                for payload in self._payloads:
                    del payload._requests[: -self.HISTORY]

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    async def _serve_list(self, request):
        """A list carries the collection's current resourceVersion (kmock: a literal '...')."""
        result = await super()._serve_list(request)
        result["metadata"]["resourceVersion"] = str(self._rv)
        return result

    async def _serve_watch(self, request):
        """A watch from resourceVersion X starts after X: the initial snapshot holds only objects
        changed since (kmock re-sends every object as ADDED, whatever the version)."""
        since = request.params.get("resourceVersion", "")
        if not since.isdigit():
            async for event in super()._serve_watch(request):
                yield event
            return
        yield b""
        async with self._lock:
            fresh = [
                {"type": "ADDED", "object": o.raw}
                for (res, ns, name), o in self.objects.items()
                if res == request.resource
                and not o.deleted
                and (request.namespace is None or ns == request.namespace)
                and int(o.raw.get("metadata", {}).get("resourceVersion", "0") or 0) > int(since)
            ]
        for event in fresh:
            yield event
        async for event in self._buses[request.resource]:
            obj = event.get("object", {})
            if request.namespace is None or obj.get("metadata", {}).get("namespace") == request.namespace:
                yield event

    def _key(self, request):
        return (request.resource, request.namespace, request.name)

    def _current(self, request):
        key = self._key(request)
        if key in self.objects and not self.objects[key].deleted:
            return self.objects[key]
        return None

    async def _handle(self, request):
        if request.resource is not None and request.action == enums.action.CREATE and isinstance(request.data, dict):
            plural = str(request.resource.plural)
            if self.failing_creates.get(plural, 0) > 0:
                self.failing_creates[plural] -= 1
                raise k8s.KubernetesError(status=500, reason="InternalError", message="etcdserver: request timed out")
            meta = request.data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + "".join(secrets.choice(string.ascii_lowercase) for _ in range(5))
            if request.namespace and not meta.get("namespace"):
                meta["namespace"] = request.namespace
            key = (request.resource, meta.get("namespace"), meta.get("name"))
            taken = self.objects[key] if key in self.objects else None
            if taken is not None and not taken.deleted:
                raise already_exists(plural, meta["name"])
            meta.update(
                uid=str(uuid.uuid4()),
                resourceVersion=self._next_rv(),
                creationTimestamp=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                generation=1,
            )
            if str(request.resource.plural) in self.status_subresources:
                request.data.pop("status", None)  # create ignores status when /status exists
        elif request.resource is not None and request.action == enums.action.UPDATE and request.name:
            if (
                str(request.resource.plural) in self.held_plurals
                and self._released is not None
                and isinstance(request.data, dict)
            ):
                await self._released.wait()
            current = self._current(request)
            if current is not None:
                self._rewrite_update(request, current)
        response = await super()._handle(request)
        if request.resource is not None and request.action in (enums.action.DELETE, enums.action.UPDATE):
            await self._collect_dependents()  # a delete, or a patch releasing the last finalizer
        return response

    def _rewrite_update(self, request, current) -> None:
        old = copy.deepcopy(current.raw)
        data = request.data
        if isinstance(data, list):  # JSON patch
            try:
                new = jsonpatch.apply_patch(old, data)
            except (jsonpatch.JsonPatchTestFailed, jsonpatch.JsonPatchConflict) as exc:
                raise invalid(str(exc)) from None
            data = _merge_patch_between(old, new)
            object.__setattr__(request, "data", data)
        if not isinstance(data, dict):
            return
        sent_rv = (data.get("metadata") or {}).get("resourceVersion")
        if sent_rv and sent_rv != old["metadata"].get("resourceVersion"):
            raise conflict()
        if str(request.resource.plural) in self.status_subresources:
            if request.subresource == "status":
                for k in [k for k in data if k != "status"]:
                    del data[k]
            else:
                data.pop("status", None)
        meta = data.setdefault("metadata", {})
        meta["resourceVersion"] = self._next_rv()
        if "spec" in data:
            if merge_patch.apply(old.get("spec"), data["spec"]) != old.get("spec"):
                meta["generation"] = int(old["metadata"].get("generation", 1)) + 1

    async def _collect_dependents(self) -> None:
        """Delete every object whose ownerReferences name a uid that no longer exists."""
        while True:
            alive = {o.raw["metadata"].get("uid") for o in self.objects.values() if not o.deleted}
            orphans = [
                (key, o)
                for key, o in self.objects.items()
                if not o.deleted
                and any(r.get("uid") not in alive for r in o.raw["metadata"].get("ownerReferences", []))
            ]
            if not orphans:
                return
            for (resource, _, _), o in orphans:
                raw = o.raw
                o.delete()
                await self._buses[resource].put({"type": "DELETED", "object": raw})


class EmulatorThread:
    """The emulator + an HTTP server on loopback, in a thread of their own (sync tests drive it)."""

    def __init__(self, resources: dict[str, dict]):
        self.resources = resources
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.url = ""
        self._stop: asyncio.Event | None = None
        self.emulator: RealisticEmulator | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        emulator = RealisticEmulator()
        emulator.status_subresources = {
            r.split("/")[-1] for r, info in self.resources.items() if "status" in info.get("subresources", [])
        }
        emulator.resources.load_bundled()
        for path, info in self.resources.items():
            emulator.resources[path] = kmock.ResourceInfo(**info)
        async with emulator, kmock.Server(emulator) as server:
            self.emulator = emulator
            self.url = str(server.url).rstrip("/")
            self.ready.set()
            await self._stop.wait()

    def __enter__(self) -> EmulatorThread:
        self.thread.start()
        if not self.ready.wait(30):
            raise RuntimeError("the Kubernetes emulator did not start")
        return self

    def call(self, fn, *args) -> None:
        """Run a (sync) emulator method on the emulator's own loop."""
        self.loop.call_soon_threadsafe(fn, *args)

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(timeout=10)
