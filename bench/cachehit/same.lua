-- wrk script for bench/cachehit (run through bench/lib/wrk.py as Wrk.script):
-- POST /v1/chat/completions with the SAME deterministic body every time
-- (temperature 0), so once the gateway's response cache holds its answer,
-- every request is a cache hit.
--
-- Usage: wrk ... -s same.lua URL -- MODEL API_KEY NONCE STREAM(0|1) MAX_TOKENS
--
-- The arguments are unique.lua's, so bench/lib/wrk.py can run either; NONCE
-- is ignored (the body must not change between runs). The body is built
-- exactly like bench/cachehit/run.py's `cache_body()` (same prompt, same
-- fields, same number types: `"temperature":0`, not 0.0, which would be a
-- different cache key); run.py checks that the upstream saw no request
-- during the load, so a mismatch fails the run instead of going unnoticed.
-- done() prints the same TOLLWAY_BENCH line as unique.lua.

local PROMPT = "cachehit: how much does this toll road cost?"
local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function init(args)
  local model, key, nonce = args[1], args[2], args[3]
  local stream = args[4] == "1" and "true" or "false"
  local max_tokens = tonumber(args[5])
  if model == nil or key == nil or nonce == nil or max_tokens == nil then
    error("usage: -- MODEL API_KEY NONCE STREAM(0|1) MAX_TOKENS")
  end
  count = 0
  local headers = {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer " .. key,
  }
  -- The model name must not contain '"'.
  local body = '{"model":"' .. model .. '","messages":[{"role":"user","content":"'
    .. PROMPT .. '"}],"max_tokens":' .. max_tokens .. ',"temperature":0,"stream":'
    .. stream .. '}'
  -- One request, formatted once: every request is byte-for-byte the same.
  req = wrk.format("POST", "/v1/chat/completions", headers, body)
end

function request()
  count = count + 1
  return req
end

function done(summary, latency, requests)
  local sent = 0
  for _, thread in ipairs(threads) do
    sent = sent + (thread:get("count") or 0)
  end
  local e = summary.errors
  io.write(string.format(
    'TOLLWAY_BENCH {"requests":%d,"sent":%d,"duration_us":%d,"bytes":%d,'
      .. '"connect_errors":%d,"read_errors":%d,"write_errors":%d,'
      .. '"status_errors":%d,"timeouts":%d,'
      .. '"mean_us":%.3f,"max_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d}\n',
    summary.requests, sent, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
