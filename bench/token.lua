-- wrk script: POST /v1/token with a different subject token per request (read from a file),
-- so memos of verified tokens cannot flatter the figure. Each wrk thread starts at its own offset.
local tokens = {}
local idx = 0
local prefix = "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange" ..
  "&subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Ajwt&audience=bench-team&subject_token="

local thread_no = 0
function setup(thread)
  thread:set("thread_no", thread_no)
  thread_no = thread_no + 1
end

function init(args)
  for line in io.lines(os.getenv("BENCH_TOKENS")) do
    tokens[#tokens + 1] = line
  end
  idx = (thread_no or 0) * 7919 % #tokens
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
end

function request()
  idx = idx % #tokens + 1
  return wrk.format(nil, "/v1/token", nil, prefix .. tokens[idx])
end


function done(summary, latency, requests)
  io.write(string.format("BENCH rps=%.1f p50_ms=%.2f p99_ms=%.2f requests=%d errors=%d non2xx=%d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000,
    latency:percentile(99) / 1000, summary.requests,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status))
end
