"""The Redis store's data layout: every key it uses (built in `Keys`, one place), the URL form that names a
prefix, and the Lua scripts that change a document and its indexes in one atomic step (each script's KEYS and
ARGV are described above it)."""

from __future__ import annotations

from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

DEFAULT_PREFIX = "fedml:"
LOG_CHUNK = 2000  # lines per atomic append: a 20,000-line batch must not stall Redis for everyone else


class Keys:
    """Every Redis key of one scheduler installation, under its prefix."""

    def __init__(self, prefix: str) -> None:
        self.p = prefix

    def run(self, run_id: str) -> str:
        return f"{self.p}run:{run_id}"

    @property
    def runs(self) -> str:  # zset of every run id by created_at
        return f"{self.p}runs"

    @property
    def changes(self) -> str:  # zset: run id -> the change counter at its last write (the change feed)
        return f"{self.p}changes"

    @property
    def runs_seq(self) -> str:  # the change counter
        return f"{self.p}runseq"

    def status(self, status: str) -> str:  # zset per status by created_at (QUEUED is the queue)
        return f"{self.p}status:{status}"

    def sweep(self, sweep_id: str) -> str:  # set: the runs of a sweep (Run.sweep.id)
        return f"{self.p}sweep:{sweep_id}"

    def owner(self, owner: str) -> str:
        return f"{self.p}owner:{owner}"

    def node_runs(self, node_id: str) -> str:  # set: unfinished runs with a placement on the node
        return f"{self.p}noderuns:{node_id}"

    def gpus(self, node_id: str) -> str:  # hash: GPU index -> run id holding it
        return f"{self.p}gpus:{node_id}"

    @property
    def quota_held(self) -> str:  # hash: quota key "team\tbucket" -> GPUs its unfinished runs hold (PUT_RUN)
        return f"{self.p}quotaheld"

    @property
    def teams(self) -> str:  # hash: team name -> doc
        return f"{self.p}teams"

    def series(self, key: str, tier: int, block: int) -> str:  # string of packed points; expires with its block
        return f"{self.p}series:{tier}:{block}:{key}"

    def logs(self, run_id: str) -> str:  # stream
        return f"{self.p}logs:{run_id}"

    def log_pos(self, run_id: str) -> str:  # next log position of the run
        return f"{self.p}logpos:{run_id}"

    def log_seq(self, run_id: str) -> str:  # hash: "attempt:rank" -> next expected seq
        return f"{self.p}logseq:{run_id}"

    @property
    def nodes(self) -> str:  # hash: node id -> doc
        return f"{self.p}nodes"

    @property
    def endpoints(self) -> str:  # set: the unsettled runs that serve an endpoint (the gateway reads them each second)
        return f"{self.p}endpoints"

    @property
    def endpoints_built(self) -> str:  # set once the endpoints set was built from a database older than it
        return f"{self.p}endpointsbuilt"

    @property
    def keys_version(self) -> str:  # counter: moved by every API key write (the key cache checks it each second)
        return f"{self.p}keysver"

    @property
    def nodes_version(self) -> str:  # counter: moved by every node write (Store.nodes_version)
        return f"{self.p}nodesver"

    @property
    def node_seq(self) -> str:  # sorted set: node id -> nodesver at its last write or removal (nodes_since)
        return f"{self.p}nodeseq"

    @property
    def node_names(self) -> str:  # hash: node name -> node id
        return f"{self.p}nodenames"

    @property
    def seen(self) -> str:  # hash: node id -> last heartbeat
        return f"{self.p}seen"

    @property
    def keys(self) -> str:  # hash: key id -> sha256
        return f"{self.p}keys"

    @property
    def key_docs(self) -> str:  # hash: sha256 -> doc
        return f"{self.p}keydocs"

    def lock(self, name: str) -> str:
        return f"{self.p}lock:{name}"

    @property
    def channel(self) -> str:
        return f"{self.p}notify"


# KEYS: run, runs, status:old, status:new, owner, [changes, the change counter: left out by a quiet write]
# ARGV: run id, expected doc ("" = create), new doc, created_at, gpu prefix, noderuns prefix,
#       endpoints set, "+" (an unsettled run with an endpoint) / "-" (one that settled) / "",
#       n_old_nodes, old nodes..., n_new_nodes, new nodes..., n_release, release "node\tgpu"..., n_claim, claim...,
#       6, quota hash, old quota key, its GPUs, new quota key, its GPUs, limit (-1: no check)  (Run.quota_key)
# Returns "ok<TAB>the write's change counter" ("ok" for a quiet write), or why it wrote nothing.
# A lock's release (the value is its holder's token): as redis-py's Lock releases, sent here in a pipeline.
RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# The documents of a queued run and of those queued after it (the QUEUED zset's order: by created_at), ARGV[2] in
# all: a pass about to place a run this replica does not remember reads those it is likely to place next with
# it, in one round trip. KEYS: the QUEUED zset. ARGV: run id, how many, the run key prefix. Returns id, doc, ...
# (the run asked for first; where it is not queued, it alone).
QUEUED_DOCS = """
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
local ids = {ARGV[1]}
if s then
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], s, '+inf', 'LIMIT', 0, tonumber(ARGV[2]))) do
    if id ~= ARGV[1] then ids[#ids + 1] = id end
  end
end
local out = {}
for _, id in ipairs(ids) do
  local doc = redis.call('GET', ARGV[3] .. id)
  if doc then out[#out + 1] = id; out[#out + 1] = doc end
end
return out
"""

PUT_RUN = """
local cur = redis.call('GET', KEYS[1])
if ARGV[2] == '' then
  if cur then return 'exists' end
elseif cur ~= ARGV[2] then
  return 'conflict'
end
local i = 9
local function list()
  local n = tonumber(ARGV[i]); local out = {}
  for k = 1, n do out[k] = ARGV[i + k] end
  i = i + n + 1
  return out
end
local old_nodes, new_nodes, release, claim, quota = list(), list(), list(), list(), list()
for _, c in ipairs(claim) do
  local node, gpu = string.match(c, '^(.*)\\t(%d+)$')
  local holder = redis.call('HGET', ARGV[5] .. node, gpu)
  if holder and holder ~= ARGV[1] then return 'busy\\t' .. node .. '\\t' .. gpu .. '\\t' .. holder end
end
local qhash, qold, qold_n = quota[1], quota[2], tonumber(quota[3])
local qnew, qnew_n, qlimit = quota[4], tonumber(quota[5]), tonumber(quota[6])
if qnew ~= '' and qlimit >= 0 then
  local others = tonumber(redis.call('HGET', qhash, qnew) or '0')
  if qold == qnew then others = others - qold_n end
  if others + qnew_n > qlimit then return 'quota\\t' .. qnew .. '\\t' .. others .. '\\t' .. qlimit end
end
redis.call('SET', KEYS[1], ARGV[3])
if qold ~= '' and qold_n > 0 then redis.call('HINCRBY', qhash, qold, -qold_n) end
if qnew ~= '' and qnew_n > 0 then redis.call('HINCRBY', qhash, qnew, qnew_n) end
if KEYS[3] ~= KEYS[4] or ARGV[2] == '' then
  if ARGV[2] ~= '' then redis.call('ZREM', KEYS[3], ARGV[1]) end
  redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
end
if ARGV[2] == '' then
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
  redis.call('ZADD', KEYS[5], ARGV[4], ARGV[1])
end
for _, n in ipairs(old_nodes) do redis.call('SREM', ARGV[6] .. n, ARGV[1]) end
for _, n in ipairs(new_nodes) do redis.call('SADD', ARGV[6] .. n, ARGV[1]) end
for _, c in ipairs(release) do
  local node, gpu = string.match(c, '^(.*)\\t(%d+)$')
  if redis.call('HGET', ARGV[5] .. node, gpu) == ARGV[1] then redis.call('HDEL', ARGV[5] .. node, gpu) end
end
for _, c in ipairs(claim) do
  local node, gpu = string.match(c, '^(.*)\\t(%d+)$')
  redis.call('HSET', ARGV[5] .. node, gpu, ARGV[1])
end
if ARGV[8] == '+' then redis.call('SADD', ARGV[7], ARGV[1]) elseif ARGV[8] == '-' then redis.call('SREM', ARGV[7], ARGV[1]) end
if KEYS[6] then
  local v = redis.call('INCR', KEYS[7])
  redis.call('ZADD', KEYS[6], v, ARGV[1])
  return 'ok\t' .. v
end
return 'ok'
"""

# KEYS: log_seq hash, log_pos, stream. ARGV: "attempt:rank", rank, first_seq, retention, encoded lines...
# Returns {next_seq, gap(0|1)}.
APPEND_LOGS = """
local expected = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local first = tonumber(ARGV[3])
if first > expected then return {expected, 1} end
local n = #ARGV - 4
local skip = expected - first
if skip >= n then return {expected, 0} end
local pos = tonumber(redis.call('GET', KEYS[2]) or '0')
local seq = expected
for k = 5 + skip, #ARGV do
  redis.call('XADD', KEYS[3], '0-' .. (pos + 1), 'd', ARGV[2] .. ' ' .. seq .. ' ' .. ARGV[k])
  pos = pos + 1
  seq = seq + 1
end
redis.call('SET', KEYS[2], pos)
redis.call('HSET', KEYS[1], ARGV[1], seq)
redis.call('XTRIM', KEYS[3], 'MAXLEN', '~', ARGV[4])
return {seq, 0}
"""

# KEYS: nodes, node_names. ARGV: id, name, doc. Node names are unique, as in the SQLite store.
PUT_NODE = """
local other = redis.call('HGET', KEYS[2], ARGV[2])
if other and other ~= ARGV[1] then return 'taken' end
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  local was = cjson.decode(old)['name']
  if was ~= ARGV[2] then redis.call('HDEL', KEYS[2], was) end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[4], redis.call('INCR', KEYS[3]), ARGV[1])
return 'ok'
"""

# KEYS: nodes, node_names, nodes_version, node_seq, seen. ARGV: node id. Removes the node and its name; the
# removal is in the change feed (node_seq keeps the id, with the version of its removal).
DEL_NODE = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then redis.call('HDEL', KEYS[2], cjson.decode(old)['name']) end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[1])
redis.call('ZADD', KEYS[4], redis.call('INCR', KEYS[3]), ARGV[1])
return 'ok'
"""

# KEYS: hash[, a counter to move with the write[, a sorted set that records the field at that count]]. ARGV:
# field, expected value, new value. Compare-and-set of one hash field.
CAS_FIELD = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
if KEYS[2] then
  local v = redis.call('INCR', KEYS[2])
  if KEYS[3] then redis.call('ZADD', KEYS[3], v, ARGV[1]) end
end
return 1
"""

# KEYS: keys, key_docs, keys_version. ARGV: id, sha256, doc. The version moves when a key changes, not when one
# is added: caches hold only keys found, so a new one cannot make any of them wrong ('new' is answered then).
PUT_KEY = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old and old ~= ARGV[2] then redis.call('HDEL', KEYS[2], old) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
if not old then return 'new' end
redis.call('INCR', KEYS[3])
return 'ok'
"""

# KEYS: seen, the node's runs. ARGV: node id, ts. Returns {the heartbeat before or '', the node's runs...}:
# an agent's poll asks for both, in one round trip.
# GPU series (store.append_series): KEYS are block keys; ARGV holds, per key, its packed points and the time its
# block expires. One call per batch of rows: a command pair per row cost the client most of a flush.
APPEND_SERIES = """
for i, key in ipairs(KEYS) do
  redis.call('APPEND', key, ARGV[2 * i - 1])
  redis.call('EXPIREAT', key, ARGV[2 * i])
end
return #KEYS
"""

HEARTBEAT = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local out = {old or ''}
for _, m in ipairs(redis.call('SMEMBERS', KEYS[2])) do out[#out + 1] = m end
return out
"""


# HEARTBEAT unless the node is marked OFFLINE (0): Store.heartbeat_unless_offline (a registration). 1: recorded.
HEARTBEAT_UNLESS_OFFLINE = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old and tonumber(old) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


# HEARTBEAT for a node heard from before only (Store.heartbeat_if_seen): a node with no heartbeat, or one marked
# OFFLINE (0), is left as it is and answers {''} (its first heartbeat persists its state: the poll's thread does).
HEARTBEAT_IF_SEEN = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old or tonumber(old) == 0 then return {''} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local out = {old}
for _, m in ipairs(redis.call('SMEMBERS', KEYS[2])) do out[#out + 1] = m end
return out
"""


def parse_url(url: str) -> tuple[str, str]:
    """redis://HOST:PORT/DB?prefix=P -> (the URL redis-py takes, the key prefix)."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    prefix = query.pop("prefix", [DEFAULT_PREFIX])[0]
    rest = urlencode({k: v[-1] for k, v in query.items()})
    return urlunsplit((parts.scheme, parts.netloc, parts.path, rest, parts.fragment)), prefix
