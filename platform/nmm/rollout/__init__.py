"""Rollout control: the canary's traffic splitter (router), its step judge (analysis + the
quality probe) and the local canary driver. It talks to model servers over HTTP only; the
operator and the local rollout stage drive the same step judge (`canary.judge_step`)."""
