"""The Lua twins of `model.acquire` and `model.release`, one script each, run atomically by Redis.

Each script is a line-by-line port of `ratelimit/model.py` and the pure classes under it (`BucketState`,
`GlobalLimiter`, `InvalidRequestBudget`): same order of checks, same arithmetic in the same order, so that
with the same `now` the answers are bit-for-bit those of the model (the differential tests in
`tests/ratelimit/test_redis_backend.py` hold them to it). Python computes what needs no shared state before
the call: the key names, the health verdict (`invalid.health_verdict`), whether a response counts against
the invalid-request budget, and the GCRA emission interval. Why a port instead of "Python reads, decides,
writes back" with WATCH/MULTI: that costs 2-3 round trips and retries under contention on the hottest key of
a bot; a script is one round trip and never retries. The price is two copies of the rules: a change to
`model.py` or `buckets.py` must be made here too, and the differential tests fail until it is (each Lua
function names the Python one it mirrors).

Numbers. Lua 5.1 has `math.huge` and NaN, but nothing carries them across the boundary: ARGV are strings,
`tonumber` of "inf" depends on the C library, and Redis turns a Lua number in a reply into an integer
(truncating 0.75 s to 0). So every float crosses as an 8-byte little-endian IEEE-754 double packed with
`struct` (Redis ships Lua's `struct` library; Python packs with `struct.pack("<d")`): exact, and -inf, inf
and NaN need no sentinel at all. The sentinels that remain are the model's own: a bucket's unknown limit is
-1, its unknown reset is NaN, "no cap" for `max_in_flight` is inf, a 429 without Remaining is NaN. Integers
(counters, windows, epochs) are exact in doubles below 2**53 and go back to Python as integer replies.

Records. Each value is `<d expires_at>` followed by the record: 11 doubles for a bucket (the fields of
`BucketState.to_record`), 2 for a global limiter (TAT, frozen until), 1 for a ban/block/dead-webhook
deadline, the peak and (index, count) pairs for an invalid-request budget, the raw hash (or "" for a
global-only route) for a route map entry, one byte for a dead token. `expires_at` is the model's logical
expiry, checked on every read exactly as `MemoryStore.get` does (`now >= expires_at` is absent); the key
also gets a Redis expiry (`SET ... PX`) of the remaining time plus `slack_ms`, rounded up, so idle state
disappears from Redis without ever disappearing early (`expires_at` inf: no Redis expiry either).

Time. `ARGV[2]` empty means "now" is the Redis server's `TIME` (seconds + microseconds / 1e6): the only
clock every host shares (anchors/ratelimit.md R4). Otherwise it is a packed double (tests drive time); then
the Redis expiry is unrelated to that clock and `slack_ms` is large, so that only the logical expiry
decides.

Keys. The caller passes every key the script may touch in KEYS (Redis Cluster requires it; all carry one
hash tag). The bucket key depends on the route map, which only Redis knows: the caller passes its guess
(`ARGV[4]`/`ARGV[5]`: "u" unknown, "g" global-only, "h" + hash) and the key built on it; when the map
says otherwise the script changes nothing and answers a redirect with the map's view.

Replies of the acquire script:
    {"p", has_grant, window, probe, counted, epoch, <d now>}      a permit (global counted unless exempt)
    {"w", <d seconds>, reason}                                   a wait
    {"r", "webhook" | "token" | "invalid"}                       a refusal
    {"m", "u" | "g" | "h", hash}                                 redirect: the route map disagrees
The release script answers 1, or the error `RATELIMIT_DOUBLE_RELEASE` (the model's ValueError, raised before
anything is written, as in the model).
"""

from __future__ import annotations

import math
import struct
from typing import Final

from ratelimit.model import EPOCH_MODULUS, EngineConfig

__all__ = [
    "ACQUIRE",
    "CONFIG_FIELDS",
    "DOUBLE_RELEASE",
    "RELEASE",
    "RELEASE_NUMBERS",
    "pack_config",
]

#: The error code the release script answers when the model would raise ValueError.
DOUBLE_RELEASE: Final = "RATELIMIT_DOUBLE_RELEASE"

#: ARGV[1] of both scripts: these doubles, in this order.
CONFIG_FIELDS: Final = (
    "lease_s",
    "map_ttl_s",
    "global_only_ttl_s",
    "idle_ttl_s",
    "emission_s",
    "tolerance_s",
    "global_window_s",
    "invalid_limit",
    "invalid_window_s",
    "sub_buckets",
    "sub_bucket_s",
    "shed_at",
    "stop_at",
    "webhook_ttl_s",
    "dead_token_s",
    "max_in_flight",
    "epoch_modulus",
    "slack_ms",
)
_CONFIG: Final = struct.Struct("<" + "d" * len(CONFIG_FIELDS))

#: ARGV[5] of the release script: grant window, grant epoch, header limit, remaining, reset-after, 429
#: retry-after, 429 Remaining (NaN: none), Cloudflare ban seconds.
RELEASE_NUMBERS: Final = struct.Struct("<8d")


def pack_config(config: EngineConfig, *, slack_ms: float) -> bytes:
    """ARGV[1]: the engine configuration as the scripts read it."""
    limiter = config.global_limiter()
    budget = config.invalid_budget()
    tolerance = limiter.tolerance_s
    return _CONFIG.pack(
        config.lease_s,
        config.map_ttl_s,
        config.global_only_ttl_s,
        config.idle_ttl_s,
        limiter.emission_interval_s,
        tolerance,
        config.global_window_s,
        budget.limit,
        budget.window_s,
        budget.sub_buckets,
        budget.sub_bucket_s,
        budget.shed_at,
        budget.stop_at,
        config.webhook_ttl_s,
        config.dead_token_s,
        math.inf if config.max_in_flight is None else config.max_in_flight,
        EPOCH_MODULUS,
        slack_ms,
    )


_PRELUDE: Final = r"""
local spack, sunpack = struct.pack, struct.unpack
local floor, ceil, max, min = math.floor, math.ceil, math.max, math.min
local INF = math.huge
local NAN = -(INF - INF)

local LEASE_S, MAP_TTL_S, GLOBAL_ONLY_TTL_S, IDLE_TTL_S, EMISSION_S, TOLERANCE_S, GLOBAL_WINDOW_S,
      INVALID_LIMIT, INVALID_WINDOW_S, SUB_BUCKETS, SUB_BUCKET_S, SHED_AT, STOP_AT, WEBHOOK_TTL_S,
      DEAD_TOKEN_S, MAX_IN_FLIGHT, EPOCH_MODULUS, SLACK_MS = sunpack('<dddddddddddddddddd', ARGV[1])

local NOW
if ARGV[2] == '' then
  local t = redis.call('TIME')
  NOW = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  NOW = sunpack('<d', ARGV[2])
end

local function finite(x) return x == x and x ~= INF and x ~= -INF end
local function d(x) return spack('<d', x) end

-- records: <d expires_at> .. payload ------------------------------------------------------------------

local function live(value)  -- the payload, or nil when absent or expired at NOW (MemoryStore.get)
  if not value then return nil end
  if NOW >= sunpack('<d', value) then return nil end
  return string.sub(value, 9)
end

local function put(key, payload, expires_at)  -- MemoryStore.put, plus a Redis expiry for idle state
  local value = spack('<d', expires_at) .. payload
  if expires_at == INF then
    redis.call('SET', key, value)
    return
  end
  local ms = ceil((expires_at - NOW) * 1000 + SLACK_MS)
  if ms > 0 then
    redis.call('SET', key, value, 'PX', ms)
  else
    redis.call('DEL', key)
  end
end

local function until_of(value)  -- model._until
  local payload = live(value)
  if payload then return (sunpack('<d', payload)) end
  return -INF
end

local function put_until(key, till)  -- model._put_until: the previous deadline is read even if expired
  local previous = redis.call('GET', key)
  if previous then till = max(till, (sunpack('<d', previous, 9))) end
  put(key, spack('<d', till), till)
end

-- BucketState --------------------------------------------------------------------------------------

local function load_bucket(payload)  -- model.load_bucket: from_record, or a fresh state
  -- model.new_epoch: a recreated record starts from another lease generation than its predecessor.
  local b = {limit = nil, remaining = 0, in_flight = 0, window = 0, epoch = floor(NOW * 1000) % EPOCH_MODULUS,
             probing = false,
             global_only = false, lost = 0, reset = nil, blocked = -INF, lease = -INF, period = 0.0}
  if payload then
    local limit, remaining, in_flight, window, epoch, flags, lost, reset, blocked, lease, period =
      sunpack('<ddddddddddd', payload)
    if limit >= 0 then b.limit = limit end
    b.remaining, b.in_flight, b.window, b.epoch, b.lost = remaining, in_flight, window, epoch, lost
    b.probing = flags % 2 == 1
    b.global_only = floor(flags / 2) % 2 == 1
    if reset == reset then b.reset = reset end
    b.blocked, b.lease, b.period = blocked, lease, period
  end
  return b
end

local function save_bucket(key, b)  -- model.save_bucket (BucketState.to_record)
  local flags = (b.probing and 1 or 0) + (b.global_only and 2 or 0)
  local horizon = max(NOW, b.blocked, b.lease, b.reset or NOW)
  put(key, spack('<ddddddddddd', b.limit or -1, b.remaining, b.in_flight, b.window, b.epoch, flags, b.lost,
                 b.reset or NAN, b.blocked, b.lease, b.period), horizon + IDLE_TTL_S)
end

local function lease_deadline(b)
  if b.in_flight > 0 then return b.lease end
  return -INF
end

local function roll(b)
  if b.limit and b.reset and NOW >= b.reset then
    b.remaining = max(0, b.limit - b.in_flight - b.lost)
    b.lost = 0
    b.reset = nil
    b.window = b.window + 1
  end
end

local function grant(b, probe, counted)
  b.in_flight = b.in_flight + 1
  b.lease = max(b.lease, NOW + LEASE_S)
  if probe then b.probing = true end
  return {b.window, probe and 1 or 0, counted and 1 or 0, b.epoch}
end

local function expire_leases(b)
  if b.in_flight > 0 and NOW >= b.lease then
    b.in_flight = 0
    b.probing = false
    b.epoch = b.epoch + 1
  end
end

local function try_acquire(b)  -- a grant {window, probe, counted, epoch}, or nil and the wait
  expire_leases(b)
  if NOW < b.blocked then return nil, b.blocked - NOW end
  if b.global_only then return grant(b, false, false) end
  if not b.limit then
    if b.probing then return nil, INF end
    return grant(b, true, false)
  end
  roll(b)
  if b.remaining > 0 then
    b.remaining = b.remaining - 1
    return grant(b, false, true)
  end
  if b.reset then return nil, b.reset - NOW end
  if b.in_flight > 0 then return nil, INF end
  return grant(b, true, false)
end

local function release_grant(b, g)  -- BucketState._release
  if g.epoch ~= b.epoch then return false end
  if b.in_flight == 0 then
    -- The model's ValueError. Nothing has been written yet: the bucket is the release script's first write.
    error({err = 'RATELIMIT_DOUBLE_RELEASE a grant was given back twice, or to another bucket'})
  end
  b.in_flight = b.in_flight - 1
  if g.probe then b.probing = false end
  return true
end

local function on_response(b, h, g)
  roll(b)
  release_grant(b, g)
  if not h then
    b.global_only = true
    return
  end
  b.global_only = false
  b.period = max(b.period, h.reset_after)
  local deadline = NOW + h.reset_after
  if not b.limit then
    b.limit = h.limit
    b.remaining = max(0, min(h.remaining, h.limit - b.in_flight))
    b.reset = deadline
    return
  end
  roll(b)
  if g.window < b.window then
    if deadline <= (b.reset or NOW) then return end
  end
  b.limit = h.limit
  b.remaining = max(0, min(b.remaining, h.remaining, h.limit))
  if b.reset then b.reset = max(b.reset, deadline) else b.reset = deadline end
end

local function on_cancel(b, g)
  roll(b)
  if not release_grant(b, g) then return end
  if g.counted and b.limit then
    b.remaining = min(b.limit, b.remaining + 1)
  end
end

local function on_lost(b, g)
  if g.probe and not b.limit and g.epoch == b.epoch then return end  -- the probe keeps its lease
  roll(b)
  if not release_grant(b, g) or not b.limit then return end
  if b.reset then
    b.lost = b.lost + 1
  else
    b.reset = NOW + b.period
  end
end

local function on_rate_limited(b, scope, retry_after, remaining, g)  -- the action and its deadline
  roll(b)
  release_grant(b, g)
  local till = NOW + retry_after
  if scope == 'global' then return 'global', till end
  if scope == 'shared' then
    b.blocked = max(b.blocked, till)
    return 'block', till
  end
  if remaining and remaining > 0 then return 'sub', till end
  if not b.limit then
    b.blocked = max(b.blocked, till)
  else
    roll(b)
    b.remaining = 0
    if b.reset then b.reset = max(b.reset, till) else b.reset = till end
  end
  return 'block', till
end

local function adopt(b, h)
  if b.limit then return end
  b.limit = h.limit
  b.remaining = max(0, min(h.remaining, h.limit - b.in_flight))
  b.reset = NOW + h.reset_after
  b.period = max(b.period, h.reset_after)
end

-- GlobalLimiter: TAT and frozen-until ----------------------------------------------------------------

local function load_global(value)
  local payload = live(value)
  if payload then
    local tat, frozen = sunpack('<dd', payload)
    return tat, frozen
  end
  return -INF, -INF
end

local function save_global(key, tat, frozen)
  put(key, spack('<dd', tat, frozen), max(tat, frozen) + GLOBAL_WINDOW_S)
end

-- InvalidRequestBudget: peak, then (sub-bucket index, count) pairs -----------------------------------

local function load_invalid(payload)  -- peak, indices, counts; nothing expired yet
  local n = #payload / 8
  local values = {sunpack('<' .. string.rep('d', n), payload)}
  local indices, counts = {}, {}
  for i = 2, n - 1, 2 do
    indices[#indices + 1] = values[i]
    counts[#counts + 1] = values[i + 1]
  end
  return values[1], indices, counts
end

local function first_live(indices, index)  -- _expire: the first pair not older than the window
  local oldest = index - SUB_BUCKETS
  local first = 1
  while first <= #indices and indices[first] < oldest do first = first + 1 end
  return first
end
"""

_ACQUIRE_BODY: Final = r"""
-- KEYS: ban, credential (hook|webhook or dead|token), inv, sub, glb, map, bucket (guessed; a placeholder
-- when the guess is global-only). ARGV: config, now, flags (e exempt, o optional, w webhook, t token),
-- guessed route kind (u, g, h), guessed hash.
local flags = ARGV[3]
local exempt = string.find(flags, 'e', 1, true) ~= nil
local v = redis.call('MGET', unpack(KEYS))

local banned = until_of(v[1])
if banned > NOW then return {'w', d(banned - NOW), 'ban'} end
if string.find(flags, 'w', 1, true) then
  if until_of(v[2]) > NOW then return {'r', 'webhook'} end
elseif string.find(flags, 't', 1, true) and live(v[2]) then
  return {'r', 'token'}
end
local invalid = live(v[3])
if invalid then
  local _, indices, counts = load_invalid(invalid)
  local count = 0
  for i = first_live(indices, floor(NOW / SUB_BUCKET_S)), #counts do count = count + counts[i] end
  local threshold = STOP_AT
  if string.find(flags, 'o', 1, true) then threshold = SHED_AT end
  if not (count < threshold * INVALID_LIMIT) then return {'r', 'invalid'} end
end
local blocked = until_of(v[4])
if blocked > NOW then return {'w', d(blocked - NOW), 'sublimit'} end
local tat, frozen
if not exempt then
  tat, frozen = load_global(v[5])
  local wait = max(0.0, frozen - NOW, tat - TOLERANCE_S - NOW)
  if wait > 0.0 then return {'w', d(wait), 'global'} end
end

local route = live(v[6])
local kind = 'h'
if route == nil then kind = 'u' elseif route == '' then kind = 'g' end
if kind ~= ARGV[4] or (kind == 'h' and route ~= ARGV[5]) then return {'m', kind, route or ''} end

local g = nil
if kind ~= 'g' then
  local b = load_bucket(live(v[7]))
  expire_leases(b)
  if b.in_flight >= MAX_IN_FLIGHT then
    save_bucket(KEYS[7], b)
    return {'w', d(lease_deadline(b) - NOW), 'probe'}
  end
  local blocked_before = b.blocked
  local result, wait = try_acquire(b)
  save_bucket(KEYS[7], b)
  if not result then
    if wait == INF then
      local lease_left = lease_deadline(b) - NOW
      if finite(lease_left) and lease_left > 0 then return {'w', d(lease_left), 'probe'} end
      return {'w', d(INF), 'probe'}
    end
    if blocked_before > NOW then return {'w', d(wait), 'blocked'} end
    return {'w', d(wait), 'bucket'}
  end
  g = result
end
if not exempt then
  tat = max(tat, NOW) + EMISSION_S
  save_global(KEYS[5], tat, frozen)
end
if g then return {'p', 1, g[1], g[2], g[3], g[4], d(NOW)} end
return {'p', 0, 0, 0, 0, 0, d(NOW)}
"""

_RELEASE_BODY: Final = r"""
-- KEYS: bucket of the permit (a placeholder without one), glb, sub, inv, ban, credential, map, learned
-- bucket (a placeholder without a learned hash). ARGV: config, now, outcome kind (r response, l limited,
-- c cancel, x lost), flags, numbers (RELEASE_NUMBERS), 429 scope ('' none), learned hash.
-- Flags: b has a bucket grant, p probe, c counted, g global counted, e exempt, h has headers, B headers
-- name a bucket, L a Discord 429, m learn the route, i counts as invalid, W webhook dead, T token revoked.
local kind, flags = ARGV[3], ARGV[4]
local function has(c) return string.find(flags, c, 1, true) ~= nil end
local window, epoch, h_limit, h_remaining, h_reset_after, retry_after, limited_remaining, ban_s =
  sunpack('<dddddddd', ARGV[5])
local g = {window = window, epoch = epoch, probe = has('p'), counted = has('c')}
local h = nil
if has('h') then h = {limit = h_limit, remaining = h_remaining, reset_after = h_reset_after} end
if limited_remaining ~= limited_remaining then limited_remaining = nil end
local scope = ARGV[6]

local action, till = nil, nil
local handled = false
if has('b') then
  -- A record that expired holds nothing of this grant: skip the give-back.
  local payload = live(redis.call('GET', KEYS[1]))
  if payload then
    handled = true
    local b = load_bucket(payload)
    if kind == 'c' then
      on_cancel(b, g)
    elseif kind == 'x' then
      on_lost(b, g)
    elseif kind == 'r' then
      on_response(b, h, g)
    elseif has('L') then
      action, till = on_rate_limited(b, scope, retry_after, limited_remaining, g)
    else
      on_lost(b, g)  -- Cloudflare: the ban below stops everything
    end
    save_bucket(KEYS[1], b)
  end
end
if not handled and kind == 'l' and has('L') then
  -- model.classify_429: no bucket record to ask (a global-only route, or one that expired meanwhile).
  if scope == 'global' then
    action, till = 'global', NOW + retry_after
  elseif scope ~= 'shared' and limited_remaining and limited_remaining > 0 then
    action, till = 'sub', NOW + retry_after
  end
end

if has('m') then  -- model._learn_route
  local route = live(redis.call('GET', KEYS[7]))
  if not h then
    if route ~= '' then put(KEYS[7], '', NOW + GLOBAL_ONLY_TTL_S) end
  elseif has('B') then
    local learned = ARGV[7]
    if route ~= learned then put(KEYS[7], learned, NOW + MAP_TTL_S) end
    if KEYS[8] ~= KEYS[1] then
      local target = load_bucket(live(redis.call('GET', KEYS[8])))
      if not target.limit then
        adopt(target, h)
        save_bucket(KEYS[8], target)
      end
    end
  end
end

if has('g') and (kind == 'c' or action == 'global') then
  local tat, frozen = load_global(redis.call('GET', KEYS[2]))
  if kind == 'c' then tat = max(tat - EMISSION_S, NOW) end
  if action == 'global' then
    frozen = max(frozen, till)
    tat = max(tat, till)
  end
  save_global(KEYS[2], tat, frozen)
elseif action == 'global' and not has('e') then
  local tat, frozen = load_global(redis.call('GET', KEYS[2]))
  frozen = max(frozen, till)
  tat = max(tat, till)
  save_global(KEYS[2], tat, frozen)
end
if action == 'sub' then put_until(KEYS[3], till) end

if has('i') then  -- InvalidRequestBudget.record + model.save_invalid
  local payload = live(redis.call('GET', KEYS[4]))
  local peak, indices, counts = 0, {}, {}
  if payload then peak, indices, counts = load_invalid(payload) end
  local index = floor(NOW / SUB_BUCKET_S)
  local kept = {}
  local total = 0
  for i = first_live(indices, index), #indices do
    kept[#kept + 1] = indices[i]
    kept[#kept + 1] = counts[i]
    total = total + counts[i]
  end
  if #kept > 0 and kept[#kept - 1] >= index then
    kept[#kept] = kept[#kept] + 1
  else
    kept[#kept + 1] = index
    kept[#kept + 1] = 1
  end
  total = total + 1
  peak = max(peak, total)
  put(KEYS[4], spack('<' .. string.rep('d', #kept + 1), peak, unpack(kept)),
      NOW + INVALID_WINDOW_S + SUB_BUCKET_S)
end

if kind == 'l' and not has('L') then put_until(KEYS[5], NOW + ban_s) end
if has('W') then
  put_until(KEYS[6], NOW + WEBHOOK_TTL_S)
elseif has('T') then
  put(KEYS[6], '\1', NOW + DEAD_TOKEN_S)
end
return 1
"""

ACQUIRE: Final = _PRELUDE + _ACQUIRE_BODY
RELEASE: Final = _PRELUDE + _RELEASE_BODY
