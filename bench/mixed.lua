-- wrk script of bench/run-mixed.sh (appended to the lines that define
-- server, files, images and body): 80% downloads of a random item of the
-- working set, 10% uploads of a distinct 64 KiB body, 10% 96x96 thumbnails
-- of a random image. Counts per kind are printed at the end ("kind ...").

local threads = {}
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("id", counter)
  table.insert(threads, thread)
end

-- Globals, so that done() can read them from each thread (thread:get).
downloads, uploads, thumbs, n = 0, 0, 0, 0
failed = {}

function response(status, headers, body)
  if status >= 300 then
    local k = tostring(status) .. " " .. string.sub(body or "", 1, 120)
    failed[k] = (failed[k] or 0) + 1
  end
end

function init(args)
  math.randomseed(id * 7919 + os.time())
end

function request()
  local r = math.random(100)
  if r <= 80 then
    downloads = downloads + 1
    return wrk.format("GET", "/_matrix/client/v1/media/download/" .. server .. "/" .. files[math.random(#files)])
  elseif r <= 90 then
    uploads = uploads + 1
    n = n + 1
    -- A distinct body each time: a new blob and a new row. (Headers given
    -- to wrk.format replace wrk.headers: the token is repeated here.)
    local b = string.format("%08d:%08d:", id, n) .. body
    return wrk.format("POST", "/_matrix/media/v3/upload", {["Content-Type"] = "application/octet-stream", ["Authorization"] = "Bearer bench"}, b)
  else
    thumbs = thumbs + 1
    return wrk.format("GET", "/_matrix/client/v1/media/thumbnail/" .. server .. "/" .. images[math.random(#images)] .. "?width=96&height=96&method=scale")
  end
end

function done(summary, latency, requests)
  local d, u, t = 0, 0, 0
  for _, th in ipairs(threads) do
    d = d + th:get("downloads")
    u = u + th:get("uploads")
    t = t + th:get("thumbs")
  end
  io.write(string.format("kind downloads=%d uploads=%d thumbnails=%d\n", d, u, t))
  for _, th in ipairs(threads) do
    local f = th:get("failed")
    for k, v in pairs(f) do
      io.write(string.format("failed %d x %s\n", v, k))
    end
  end
end
