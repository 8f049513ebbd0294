"""kvlm on Ray Serve (the optional `ray` extra): engine replicas sharing the KV offload tiers,
behind one OpenAI-compatible ingress with prefix-affinity routing. See docs/scaling.md.

`app.build_application` / `app.app_builder` build the application, `local.start` runs it;
`affinity` (which replica holds a prefix) is pure Python and imports no Ray.
"""
