-- wrk script for the benchmarks under bench/ (run by bench/lib/wrk.py):
-- POST /v1/chat/completions where every request carries a unique prompt, so no
-- response cache can turn the benchmark into a cache-hit benchmark; or, with
-- MODE "same" (bench/cachehit), the SAME deterministic body every time
-- (temperature 0), built exactly like bench/cachehit/run.py's cache_body()
-- ("temperature":0, not 0.0, which would be another cache key), so that once
-- the gateway's cache holds its answer every request is a cache hit.
--
-- Usage: wrk ... -s unique.lua URL -- MODEL API_KEY NONCE STREAM(0|1) MAX_TOKENS [MODE]
--
-- The prompt is "bench NONCE-THREAD-COUNTER ..."; NONCE is fresh for every wrk
-- invocation, THREAD is wrk's thread number and COUNTER counts that thread's
-- requests. done() prints one machine-readable line, prefixed TOLLWAY_BENCH,
-- with exact microsecond percentiles from wrk's latency histogram.

local SAME_PROMPT = "cachehit: how much does this toll road cost?"
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
  headers = {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer " .. key,
  }
  -- %s/%d are filled per request; the model name must not contain '%' or '"'.
  if args[6] == "same" then
    -- One request, formatted once: every request is byte-for-byte the same.
    local body = '{"model":"' .. model .. '","messages":[{"role":"user","content":"'
      .. SAME_PROMPT .. '"}],"max_tokens":' .. max_tokens .. ',"temperature":0,"stream":'
      .. stream .. '}'
    same = wrk.format("POST", "/v1/chat/completions", headers, body)
  end
  template = '{"model":"' .. model .. '","messages":[{"role":"user","content":'
    .. '"bench ' .. nonce .. '-%d-%d: how much does this toll road cost?"}],'
    .. '"max_tokens":' .. max_tokens .. ',"stream":' .. stream .. '}'
end

function request()
  count = count + 1
  if same then
    return same
  end
  local body = string.format(template, tid, count)
  return wrk.format("POST", "/v1/chat/completions", headers, body)
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
