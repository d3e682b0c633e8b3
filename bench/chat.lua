-- wrk script for bench/speed.py and bench/peers.py: POSTs a chat completion whose body is
-- read from the file named by MES_BENCH_BODY. "@@N@@" in it is replaced by a request counter
-- (and the run's MES_BENCH_TAG), so that every request is a new conversation, as from many
-- users.
local prefix, suffix
local tag = os.getenv("MES_BENCH_TAG") or "run"
local count = 0
local headers = {
  ["Content-Type"] = "application/json",
  ["Authorization"] = "Bearer sk-bench",
}
-- more headers, one "Name: value" a line (bench/peers.py: what a peer needs to route)
for line in (os.getenv("MES_BENCH_HEADERS") or ""):gmatch("[^\n]+") do
  local name, value = line:match("^([^:]+):%s*(.*)$")
  headers[name] = value
end

local file = assert(io.open(os.getenv("MES_BENCH_BODY"), "rb"))
local body = file:read("*a")
file:close()
local at = assert(body:find("@@N@@", 1, true), "no @@N@@ in the body")
prefix, suffix = body:sub(1, at - 1), body:sub(at + 5)

request = function()
  count = count + 1
  return wrk.format("POST", "/v1/chat/completions", headers, prefix .. tag .. "-" .. count .. suffix)
end
