-- wrk script: the scenario comes from the SCENARIO environment variable.
--   insert: new customer_ids; update: ids from a set of 1,000, the same values each time (only
--   an id's first update writes); mix: half and half;
--   get: one customer by id (from the prefilled ones); list: page 1 of 20; echo: the insert body.
local scenario = os.getenv("SCENARIO") or "insert"
local key = os.getenv("API_KEY") or "bench-key"
local rows = tonumber(os.getenv("ROWS") or "1000")
local counter = 0
local thread_id = 0
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("thread_id", threads)
end

function init(args)
  math.randomseed(os.time() * 1000 + (thread_id or 0))
end

local headers = {
  ["Authorization"] = "Bearer " .. key,
  ["Content-Type"] = "application/json",
}

local function body(customer_id)
  return '{"customer": {"customer_id": "' .. customer_id .. '", "name": "Gavin Belson", '
    .. '"country": "US", "address_line1": "5230 Penfield Ave", "address_line2": null, '
    .. '"state": "CA", "zipcode": "91364", "email": "dinesh@piedpiper.test", '
    .. '"city": "Woodland Hills", "url": "http://hooli.com", "phone": "1-171-883-3711 x245", '
    .. '"logo_url": "http://hooli.com/logo.png", "legal_name": "Coleman-Blair", '
    .. '"legal_number": "49-008-2965"}}'
end

local function new_id()
  counter = counter + 1
  return "new-" .. thread_id .. "-" .. os.time() .. "-" .. math.random(1, 1000000000) .. "-" .. counter
end

request = function()
  local kind = scenario
  if kind == "mix" then
    if math.random() < 0.5 then kind = "insert" else kind = "update" end
  end
  if kind == "insert" or kind == "echo" then
    return wrk.format("POST", "/api/v1/customers", headers, body(new_id()))
  elseif kind == "update" then
    return wrk.format("POST", "/api/v1/customers", headers, body("upd-" .. math.random(1, 1000)))
  elseif kind == "get" then
    return wrk.format("GET", string.format("/api/v1/customers/cust-%08d", math.random(0, rows - 1)), headers)
  else
    return wrk.format("GET", "/api/v1/customers?page=1&per_page=20", headers)
  end
end
