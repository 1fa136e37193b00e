"""The paged KV cache's bookkeeping: which cache blocks each request holds, and the prefix cache.

Pure Python, no arrays: the executors hold the block pool itself (`model.cache.KVCache` with a
block table); this module decides which block ids each request's table lists.

- A pool of `n_blocks` blocks of `block_size` positions; block 0 is the null block, never
  handed out: unused table entries point at it (it stays zero, as padding writes are dropped).
- A request reserves, when it is admitted, the blocks its prompt + max_new_tokens can fill
  (not a whole context), so it can never run out mid-generation.
- Prefix sharing: a full block is named by a chained hash of every token id up to and
  including it (and the engine's fingerprint: model, cache dtype, block size, format). When a
  request's block fills it is registered under that hash; a new request whose prompt starts
  with registered blocks takes them (reference-counted, never written again: a request writes
  only positions after its shared prefix) and prefills only the rest -- at most all but its
  last prompt token, so its first token is still sampled from its own step.
- A registered block whose last holder finishes stays cached (least recently used first out)
  until the pool needs it for a new reservation.
- The partly filled last block of a finished request is kept too, named by the hash of the
  full blocks before it and the tokens it holds: a later prompt that goes on with those
  tokens (a chat resending its history: the previous reply ends mid-block) gets a copy of it
  in a fresh block of its own and resumes after them, so prefixes are shared to the token,
  not only to the block.
- On disk (`store`, a `serving.prefix_store.PrefixStore`, with `io`: the executor's
  read_block / write_block): every registered block is also written to the store (in a
  background thread, from a host copy taken when it is registered), and an admission that
  runs out of cached blocks in memory goes on with the store's, loaded into fresh blocks, so
  a restarted engine starts from the prefixes an earlier one computed. The hash seed (the
  engine's fingerprint) covers model, weights, cache dtype, block size and format version:
  another model's blocks are never found.
- Pools: one per cache (the staged executor's two micro-batches on two accelerators each
  have their own); a slot reserves from its cache's pool, and shares only blocks of that pool.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import warnings
from collections.abc import Sequence

import numpy as np

NULL_BLOCK = 0


def block_hashes(token_ids: Sequence[int], block_size: int, seed: str) -> list[str]:
    """The chained hash of each full block of `token_ids`: block i's hash covers seed and
    tokens [0, (i + 1) * block_size)."""
    out, h = [], seed
    ids = np.asarray(token_ids, np.int64)
    for i in range(len(ids) // block_size):
        h = hashlib.blake2b(h.encode() + ids[i * block_size:(i + 1) * block_size].tobytes(), digest_size=16).hexdigest()
        out.append(h)
    return out


class BlockPool:
    """Free blocks, reference counts, and the registered (hash-named) full blocks of one cache."""

    def __init__(self, n_blocks: int):
        if n_blocks < 2:
            raise ValueError(f"a block pool needs >= 2 blocks (one is the null block), got {n_blocks}")
        self.n_blocks = n_blocks
        self.free: collections.deque[int] = collections.deque(range(1, n_blocks))
        self.refs = np.zeros(n_blocks, np.int32)
        self.by_hash: dict[str, int] = {}
        self.hash_of: dict[int, str] = {}
        self.partials: dict[str, dict[int, tuple[int, ...]]] = {}  # parent hash -> {block: the tokens it holds}
        self.parent_of: dict[int, str] = {}  # partial block -> its parent hash
        self.idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, unreferenced: LRU first

    @property
    def usable(self) -> int:
        """Blocks a reservation may take now: free ones and cached ones nobody holds."""
        return len(self.free) + len(self.idle)

    def match(self, hashes: Sequence[str]) -> list[int]:
        """The registered blocks of the longest prefix of `hashes` (not yet referenced)."""
        out = []
        for h in hashes:
            b = self.by_hash.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def take(self, shared: Sequence[int], n_new: int) -> list[int] | None:
        """Reference `shared` and allocate `n_new` blocks (evicting idle cached blocks, least
        recently used first); None, with nothing changed, when the pool cannot."""
        reviving = sum(1 for b in shared if b in self.idle)
        if self.usable - reviving < n_new:
            return None
        for b in shared:
            self.idle.pop(b, None)
            self.refs[b] += 1
        new = []
        for _ in range(n_new):
            if self.free:
                b = self.free.popleft()
            else:
                b, _ = self.idle.popitem(last=False)
                self._forget(b)
            self.refs[b] = 1
            new.append(b)
        return [*shared, *new]

    def _forget(self, b: int) -> None:
        """Drop a cached block's name (it is being reused)."""
        if b in self.hash_of:
            del self.by_hash[self.hash_of.pop(b)]
        else:
            del self.partials[self.parent_of.pop(b)][b]

    def register(self, block: int, h: str) -> None:
        """Name a full block by its hash (first come: an equal block registered earlier keeps the name)."""
        if h not in self.by_hash and block not in self.hash_of:
            self.by_hash[h], self.hash_of[block] = block, h

    def register_partial(self, block: int, parent: str, tokens: Sequence[int]) -> None:
        """Keep a partly filled block, holding `tokens` after the full blocks named `parent`
        (unless an equal one is kept already)."""
        same = self.partials.setdefault(parent, {})
        if block in self.hash_of or block in self.parent_of or tuple(tokens) in same.values():
            return
        same[block], self.parent_of[block] = tuple(tokens), parent

    def match_partial(self, parent: str, upcoming: Sequence[int]) -> tuple[int, int] | None:
        """(block, n) of the kept partial block after `parent` holding the longest run of
        `upcoming`'s first tokens (all of its tokens must match), or None."""
        best = None
        for b, toks in self.partials.get(parent, {}).items():
            n = len(toks)
            if n <= len(upcoming) and tuple(upcoming[:n]) == toks and (best is None or n > best[1]):
                best = (b, n)
        return best

    def release(self, blocks: Sequence[int]) -> None:
        for b in blocks:
            self.refs[b] -= 1
            if self.refs[b] > 0:
                continue
            if b in self.hash_of or b in self.parent_of:
                self.idle[b] = None  # most recently used last
            else:
                self.free.append(b)


class KVBlocks:
    """The engine's block accounting over its pools (see the module docstring).

    pools: blocks per pool; slot_pool(slot) -> the pool of the slot's cache; prefix_caching:
    share registered blocks (else every block is private and freed at the end); seed: the
    fingerprint every block hash starts from."""

    def __init__(self, pools: Sequence[int], slot_pool, block_size: int, max_len: int, *, prefix_caching: bool = True,
                 seed: str = "", store=None, io=None):
        if store is not None and (io is None or not prefix_caching):
            raise ValueError("a prefix store needs prefix_caching and the executor's block io")
        self.store, self.io = store, io
        self._writes = None  # one writer thread: blocks go to disk in the order they were registered
        if store is not None:
            self._writes = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxmoe-prefix-store")
        self.disk_hits = 0  # blocks loaded from the store
        self.partial_hits = 0  # partly filled blocks copied for a request
        self.pools = [BlockPool(n) for n in pools]
        self.slot_pool = slot_pool
        self.block_size = block_size
        self.table_width = -(-max_len // block_size)
        self.prefix_caching = prefix_caching
        self.seed = seed
        self._held: dict[int, tuple[int, list[int]]] = {}  # request id -> (pool, its block table)
        self._hashes: dict[int, list[str]] = {}  # request id -> hashes of its prompt's full blocks
        self._registered: dict[int, int] = {}  # request id -> its blocks registered so far

    def blocks_needed(self, n_positions: int) -> int:
        return -(-n_positions // self.block_size)

    def fits_ever(self, n_positions: int) -> bool:
        """Could a request of n_positions ever get its blocks (in the smallest pool, all free)?"""
        return self.blocks_needed(n_positions) <= min(p.n_blocks - 1 for p in self.pools)

    def admit(self, req, slot: int) -> bool:
        """Reserve `req`'s blocks in the slot's pool, taking the longest registered prefix of its
        prompt; sets req.n_prefilled / req.cached_tokens to the shared positions.
        False (nothing reserved) when the pool is short now."""
        pool_id = self.slot_pool(slot)
        pool = self.pools[pool_id]
        hashes = block_hashes(req.prompt_ids, self.block_size, self.seed) if self.prefix_caching else []
        limit = (len(req.prompt_ids) - 1) // self.block_size
        shared = pool.match(hashes[:limit])
        stored = self._stored(hashes[len(shared):limit])
        need = self.blocks_needed(req.total_len)
        partial = None
        if self.prefix_caching and not stored:  # after the shared full blocks: maybe more in a kept partial block
            n = len(shared)
            parent = hashes[n - 1] if n else self.seed
            partial = pool.match_partial(parent, req.prompt_ids[n * self.block_size: len(req.prompt_ids) - 1])
        table = pool.take([*shared, partial[0]] if partial else shared, need - len(shared))
        if table is None:
            return False
        n = len(shared)
        tail = 0
        if partial is not None:  # copied into the request's own next block (it writes on after the copied tokens)
            src = table.pop(n)
            self.io.copy_block(pool_id, src, table[n])
            pool.release([src])
            tail = partial[1]
            self.partial_hits += 1
        for h, arrays in stored:  # loaded into the first fresh blocks, then shared like the others
            try:
                self.io.write_block(pool_id, table[n], arrays)
            except ValueError as e:
                warnings.warn(f"prefix store block {h} does not fit this cache ({e}); recomputing it", stacklevel=2)
                break
            pool.register(table[n], h)
            n += 1
            self.disk_hits += 1
        self._held[req.id] = (pool_id, table)
        self._hashes[req.id] = hashes
        self._registered[req.id] = n
        req.n_prefilled = req.cached_tokens = n * self.block_size + tail
        return True

    def _stored(self, hashes: Sequence[str]) -> list[tuple[str, dict]]:
        """The store's blocks for the leading run of `hashes` (empty without a store)."""
        out = []
        for h in hashes if self.store is not None else ():
            arrays = self.store.get(h)
            if arrays is None:
                break
            out.append((h, arrays))
        return out

    def table(self, req) -> list[int]:
        return self._held[req.id][1]

    def commit(self, req, n_written: int) -> None:
        """Register the request's blocks that `n_written` positions (prompt, then generated
        tokens fed back) have filled."""
        if not self.prefix_caching or req.id not in self._held:
            return
        pool_id, table = self._held[req.id]
        done = self._registered[req.id]
        full = min(n_written // self.block_size, len(table))
        if full <= done:
            return
        hashes = self._hashes[req.id]
        if full > len(hashes):  # generated tokens reached these blocks: their ids are known now
            ids = [*req.prompt_ids, *req.output_ids][: full * self.block_size]
            hashes = self._hashes[req.id] = block_hashes(ids, self.block_size, self.seed)
        pool = self.pools[pool_id]
        for i in range(done, full):
            pool.register(table[i], hashes[i])
            if self.store is not None and pool.by_hash.get(hashes[i]) == table[i] and hashes[i] not in self.store:
                self._writes.submit(self.store.put, hashes[i], self.io.read_block(pool_id, table[i]))
        self._registered[req.id] = full

    def flush(self) -> None:
        """Wait until every block handed to the store is written."""
        if self._writes is not None:
            self._writes.submit(lambda: None).result()

    def release(self, req, *, reusable: bool = False) -> None:
        """Give back the request's blocks (finished, cancelled or failed). `reusable`: its cache
        holds every position it reports written (not a failed step): keep its partly filled
        last block for prefixes that go on with its tokens."""
        held = self._held.pop(req.id, None)
        self._hashes.pop(req.id, None)
        self._registered.pop(req.id, None)
        if held is None:
            return
        pool_id, table = held
        written = req.n_prefilled + max(len(req.output_ids) - 1, 0)
        full, k = divmod(written, self.block_size)
        if reusable and self.prefix_caching and k and full < len(table):
            ids = [*req.prompt_ids, *req.output_ids]
            parent = block_hashes(ids[: full * self.block_size], self.block_size, self.seed)[-1] if full else self.seed
            self.pools[pool_id].register_partial(table[full], parent, ids[full * self.block_size: written])
        self.pools[pool_id].release(table)

    def tables(self, slots: dict[int, object], n_slots: int) -> np.ndarray:
        """int32 [n_slots, table_width]: each running slot's block table, the null block elsewhere."""
        out = np.full((n_slots, self.table_width), NULL_BLOCK, np.int32)
        for slot, req in slots.items():
            t = self._held[req.id][1]
            out[slot, : len(t)] = t
        return out
