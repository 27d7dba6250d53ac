"""A vLLM-compatible simulator: the upstream most tollway tests and benchmarks run against.

Speaks vLLM's OpenAI API, `/metrics` and timing behaviour (continuous batching),
with test-support endpoints under `/sim/`. Start with `sim.server.SimServer`,
`sim.app.create_app` or `python -m sim`; see docs/simulator.md.

Modules: `config` settings, `app` routes and lifecycle, `serving` one request,
`streaming` SSE, `responses` JSON shapes, `protocol` requests and errors,
`engine` batching and step time, `kvcache` KV and prefix cache, `textgen`
tokens and output, `metrics` Prometheus text, `faults` fault injection,
`state` shared state and counters, `admin` `/sim/` routes, `conn` client
connections, `server` in-process server, `cli` command line.
"""
