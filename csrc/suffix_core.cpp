// Compiled core of sgl_longspec.drafters.suffix_index: depth-capped, path-compressed suffix trees with
// occurrence counts, used to draft continuations of a request's token sequence (SuffixDecoding).
//
// Semantics (identical to tests/suffix_reference.py):
//   * A tree holds a multiset of token sequences. For a string s with 1 <= |s| <= D (D = max depth),
//     count(s) = number of (sequence, start) with seq[start : start + |s|] == s.
//   * The compressed trie of all such strings is stored: a node stands for the strings along its
//     edge, which all have the same count. Node strings are read from a reference occurrence
//     (ref_seq, ref_start); the node's full string is seq[ref_start : ref_start + depth].
//   * Insertion keeps, for each sequence being appended, the "pending" suffixes: the suffixes that
//     occurred before (count >= 2), which end exactly at a node boundary. Suffixes that are unique
//     live in "open" leaves whose length grows implicitly with the sequence (Ukkonen's trick), so an
//     appended token costs O(number of repeated suffixes), not O(D).
//   * Several sequences may grow at once (live outputs in the global tree). When one sequence's
//     suffix ends exactly at the current end of another live sequence's open leaf, that leaf stops
//     growing and becomes one of its owner's pending suffixes (it is now repeated); all shorter
//     unique suffixes of the owner join in the same append, so its pending list stays contiguous.
//   * Drafts: from the locus of a matched context suffix p (count c0), a continuation position q
//     has probability count(p q) / c0. Chain = follow the child of maximal count (ties, request
//     trees: the continuation whose first occurrence came first; then the smaller token id).
//     Tree = best-first by count (ties: the most recently emitted parent first, then the same
//     child order), nodes with probability < min_token_prob are never drafted.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace lsx {

using i32 = int32_t;
using u32 = uint32_t;
using i64 = int64_t;
using u64 = uint64_t;

constexpr i32 NIL = -1;
constexpr i32 OPEN = -1;  // depth marker of an open leaf: depth = min(D, seq_len - ref_start)
constexpr i32 ROOT = 0;

struct Node {
  i32 parent;
  i32 depth;  // length of the node's full string, or OPEN
  i32 count;
  i32 ref_seq;
  i32 ref_start;
  i32 tok;  // first token of the edge into this node
  i32 first_child;
  i32 next_sib;
  i32 prev_sib;
  i32 best;  // child with max (count, -tok); NIL when no children
  i32 nkids;  // number of children | HASHED when they are also in the child map
  i32 rec;    // request trees: -(start of the first occurrence) (tie-break); 0 elsewhere
};

// Child order for drafting: larger count, then the earlier first occurrence, then smaller token.
inline bool better_child(const Node& a, const Node& b) {
  if (a.count != b.count) return a.count > b.count;
  if (a.rec != b.rec) return a.rec > b.rec;
  return a.tok < b.tok;
}

// Children of a node are a doubly linked sibling list; once a node has more than HASH_AT
// children they are also indexed by the (parent, token) hash map.
constexpr i32 HASHED = 1 << 30;
constexpr i32 KIDS_MASK = HASHED - 1;
constexpr i32 HASH_AT = 6;

// Open addressing (linear probing, backward-shift deletion) map (parent, token) -> child.
class ChildMap {
 public:
  struct Slot {
    u64 key;
    i32 val;
    i32 pad;
  };
  static constexpr u64 EMPTY = ~0ull;

  ChildMap() { reset(16); }
  void reset(size_t cap) {
    std::vector<Slot>(cap, Slot{EMPTY, NIL, 0}).swap(slots_);
    mask_ = cap - 1;
    size_ = 0;
  }
  void reserve(size_t n) {
    size_t cap = slots_.size();
    while (n * 2 > cap) cap *= 2;
    if (cap != slots_.size()) rehash(cap);
  }
  static inline u64 key(i32 p, i32 t) { return (u64(u32(p)) << 32) | u64(u32(t)); }
  static inline size_t mix(u64 k) {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    return size_t(k);
  }
  inline i32 find(i32 p, i32 t) const {
    const u64 k = key(p, t);
    size_t i = mix(k) & mask_;
    while (true) {
      const Slot& s = slots_[i];
      if (s.key == k) return s.val;
      if (s.key == EMPTY) return NIL;
      i = (i + 1) & mask_;
    }
  }
  inline void prefetch(i32 p, i32 t) const {
    __builtin_prefetch(&slots_[mix(key(p, t)) & mask_]);
  }
  inline void insert(i32 p, i32 t, i32 v) {
    if ((size_ + 1) * 2 > slots_.size()) rehash(slots_.size() * 2);
    put(key(p, t), v);
    size_++;
  }
  inline void assign(i32 p, i32 t, i32 v) {
    const u64 k = key(p, t);
    size_t i = mix(k) & mask_;
    while (slots_[i].key != k) i = (i + 1) & mask_;
    slots_[i].val = v;
  }
  void erase(i32 p, i32 t) {
    const u64 k = key(p, t);
    size_t i = mix(k) & mask_;
    while (slots_[i].key != k) i = (i + 1) & mask_;
    size_t j = i;
    while (true) {
      j = (j + 1) & mask_;
      if (slots_[j].key == EMPTY) break;
      const size_t h = mix(slots_[j].key) & mask_;
      const bool stay = (i <= j) ? (i < h && h <= j) : (i < h || h <= j);
      if (!stay) {
        slots_[i] = slots_[j];
        i = j;
      }
    }
    slots_[i].key = EMPTY;
    slots_[i].val = NIL;
    size_--;
    if (slots_.size() > 4096 && size_ * 8 < slots_.size()) rehash(slots_.size() / 2);
  }
  size_t size() const { return size_; }
  size_t capacity_bytes() const { return slots_.capacity() * sizeof(Slot); }

 private:
  inline void put(u64 k, i32 v) {
    size_t i = mix(k) & mask_;
    while (slots_[i].key != EMPTY) i = (i + 1) & mask_;
    slots_[i].key = k;
    slots_[i].val = v;
  }
  void rehash(size_t cap) {
    std::vector<Slot> old;
    old.swap(slots_);
    std::vector<Slot>(cap, Slot{EMPTY, NIL, 0}).swap(slots_);
    mask_ = cap - 1;
    for (const Slot& s : old)
      if (s.key != EMPTY) put(s.key, s.val);
  }
  std::vector<Slot> slots_;
  size_t mask_ = 0;
  size_t size_ = 0;
};

struct Seq {
  std::vector<i32> tok;
  i32 len = 0;            // tokens inserted into the tree so far
  std::vector<i32> ends;  // node where each suffix ends (removable trees only)
  bool used = false;
  bool rescue = false;  // a private copy of one node string, kept while nodes reference it
  i32 refs = 0;         // rescue copies: number of nodes referencing it
  // Still being appended to (from new_seq until finalize). Several sequences of one tree may be
  // live at once (the global tree's live outputs); each keeps its own pending loci.
  bool live = false;
  std::vector<i32> pend;  // pend[d-1] = node where the repeated suffix of length d ends
};

struct DraftBuf {
  std::vector<i32> tok;
  std::vector<i32> par;
  std::vector<float> prob;
  double score = 0.0;
  i32 first_node = NIL;
  void clear() {
    tok.clear();
    par.clear();
    prob.clear();
    score = 0.0;
    first_node = NIL;
  }
  size_t size() const { return tok.size(); }
  void swap(DraftBuf& o) {
    tok.swap(o.tok);
    par.swap(o.par);
    prob.swap(o.prob);
    std::swap(score, o.score);
    std::swap(first_node, o.first_node);
  }
};

struct HeapItem {
  i32 cnt;
  i32 par;
  i32 rec;
  i32 tok;
  i32 node;
  i32 depth;  // absolute depth of the position to emit
};
// Max-heap order: larger count, then larger (more recently drafted) parent index, then the more
// recent occurrence, then smaller token.
struct HeapLess {
  bool operator()(const HeapItem& a, const HeapItem& b) const {
    if (a.cnt != b.cnt) return a.cnt < b.cnt;
    if (a.par != b.par) return a.par < b.par;
    if (a.rec != b.rec) return a.rec < b.rec;
    return a.tok > b.tok;
  }
};

struct SpecParams {
  i32 max_spec_tokens;
  double factor;
  double offset;
  double min_prob;
  bool use_tree;
  i32 max_tree_nodes;
};

inline i32 budget_for(i32 m, double factor, double offset, i32 cap) {
  double x = std::floor(double(m) * factor + offset + 1e-9);
  if (!(x > 0.0)) return 0;
  if (x >= double(cap)) return cap;
  return i32(x);
}

class Tree {
 public:
  Tree(int D, bool removable) : D_(D), removable_(removable) {
    nodes_.push_back(Node{NIL, 0, 0, NIL, 0, NIL, NIL, NIL, NIL, NIL, HASHED, 0});
    live_nodes_ = 1;
  }

  int max_depth() const { return D_; }

  // ---------------------------------------------------------------- sequences
  i32 new_seq() {
    i32 s;
    if (!free_seqs_.empty()) {
      s = free_seqs_.back();
      free_seqs_.pop_back();
    } else {
      s = i32(seqs_.size());
      seqs_.emplace_back();
    }
    Seq& q = seqs_[s];
    q.tok.clear();
    q.ends.clear();
    q.len = 0;
    q.used = true;
    q.rescue = false;
    q.refs = 0;
    q.live = true;
    q.pend.clear();
    num_used_seqs_++;
    return s;
  }
  const Seq& seq(i32 s) const { return seqs_[s]; }
  bool is_response(i32 s) const {
    return s >= 0 && s < i32(seqs_.size()) && seqs_[s].used && !seqs_[s].rescue;
  }
  Seq& seq_mut(i32 s) { return seqs_[s]; }
  i32 num_seqs() const { return num_used_seqs_; }

  void reserve(size_t tokens) {
    nodes_.reserve(nodes_.size() + tokens + tokens / 2 + 16);
    children_.reserve(children_.size() + tokens / 2 + 16);
  }

  // Append token t (already stored at seqs_[s].tok[len]) to the live sequence s.
  void append_next(i32 s) {
    Seq& q = seqs_[s];
    std::vector<i32>& pend = q.pend;
    const i32 n = q.len;
    const i32 t = q.tok[n];
    q.len = n + 1;
    const i32 P = i32(pend.size());
    for (i32 d = P; d >= 1; --d) prefetch_child(pend[d - 1], t);
    children_.prefetch(ROOT, t);
    pend2_.clear();
    // pend[d-1] = node where the suffix of length d ends (start n - d), d = 1..P.
    // Longer suffixes may become unique (leaves); once one stays repeated, all shorter do too.
    i32 d = P;
    for (; d >= 1; --d) {
      bool leaf = false;
      const i32 r = step(pend[d - 1], d, t, s, n - d, leaf);
      if (leaf) {
        if (removable_) q.ends[n - d] = r;
        continue;
      }
      // stays repeated: all shorter suffixes stay too
      pend2_.resize(d + 1);
      pend2_[d] = r;  // new length d + 1
      for (i32 e = d - 1; e >= 1; --e) {
        bool lf = false;
        const i32 r2 = step(pend[e - 1], e, t, s, n - e, lf);
        if (lf) throw std::logic_error("suffix index invariant violated (pending order)");
        pend2_[e] = r2;
      }
      break;
    }
    {
      bool leaf = false;
      const i32 r = step(ROOT, 0, t, s, n, leaf);
      if (leaf) {
        if (removable_) q.ends[n] = r;
        if (!pend2_.empty()) throw std::logic_error("suffix index invariant violated (root)");
      } else {
        if (pend2_.empty()) pend2_.resize(1);
        pend2_[0] = r;
      }
    }
    // Suffixes that reached the depth cap stop here.
    if (i32(pend2_.size()) >= D_) {
      const i32 node = pend2_[D_ - 1];
      if (removable_) q.ends[n + 1 - D_] = node;
      pend2_.resize(D_ - 1);
    }
    pend.swap(pend2_);
  }

  // Finish inserting sequence s: record where the pending suffixes end and fix the length of
  // its open leaves (removable trees only).
  void finalize(i32 s) {
    Seq& q = seqs_[s];
    const i32 L = q.len;
    if (removable_) {
      for (i32 d = 1; d <= i32(q.pend.size()); ++d) q.ends[L - d] = q.pend[d - 1];
      for (i32 i = 0; i < L; ++i) {
        Node& v = nodes_[q.ends[i]];
        if (v.depth == OPEN) v.depth = std::min(D_, seqs_[v.ref_seq].len - v.ref_start);
      }
    }
    std::vector<i32>().swap(q.pend);
    q.live = false;
  }

  // Pending loci of the live sequence s (pending(s)[d-1]: repeated suffix of length d).
  const std::vector<i32>& pending(i32 s) const { return seqs_[s].pend; }
  bool is_live(i32 s) const { return s >= 0 && s < i32(seqs_.size()) && seqs_[s].live; }

  // Remove sequence s (removable trees only); a live one is finalized first (rollback).
  void remove_seq(i32 s) {
    if (seqs_[s].live) finalize(s);
    Seq& q = seqs_[s];
    visit_.clear();
    for (i32 i = 0; i < q.len; ++i) {
      i32 v = q.ends[i];
      while (v != ROOT) {
        nodes_[v].count -= 1;
        visit_.push_back(v);
        v = nodes_[v].parent;
      }
    }
    std::sort(visit_.begin(), visit_.end());
    visit_.erase(std::unique(visit_.begin(), visit_.end()), visit_.end());
    order_.clear();
    order_.reserve(visit_.size());
    for (i32 v : visit_) order_.push_back((u64(u32(nodes_[v].depth)) << 32) | u64(u32(v)));
    std::sort(order_.begin(), order_.end(), [](u64 a, u64 b) { return a > b; });
    for (u64 key : order_) {
      const i32 v = i32(u32(key & 0xffffffffu));
      Node& V = nodes_[v];
      if (V.count == 0) {
        unlink_child(V.parent, v);
        free_node(v);
        continue;
      }
      if (V.ref_seq == s) {
        if (V.first_child != NIL) {
          const Node& C = nodes_[V.first_child];
          set_ref(v, C.ref_seq, C.ref_start);
        } else {
          const i32 len = V.depth;
          const i32 r = new_seq();
          Seq& R = seqs_[r];
          Seq& Q = seqs_[s];
          R.rescue = true;
          R.tok.assign(Q.tok.begin() + V.ref_start, Q.tok.begin() + V.ref_start + len);
          R.len = len;
          num_used_seqs_--;  // rescue copies are not counted as sequences
          set_ref(v, r, 0);
        }
      }
      recompute_best(v);
      // Merge into the single child when no occurrence ends here.
      if (V.first_child != NIL) {
        const i32 c = V.first_child;
        if (nodes_[c].next_sib == NIL && nodes_[c].count == V.count) {
          absorb(v, c);
        }
      }
    }
    Seq& Q = seqs_[s];
    std::vector<i32>().swap(Q.tok);
    std::vector<i32>().swap(Q.ends);
    Q.len = 0;
    Q.used = false;
    free_seqs_.push_back(s);
    num_used_seqs_--;
    reopen_unique_pending();
  }

  // After a removal, a live sequence's longest pending suffixes may have lost their other
  // occurrences (count 1: only the live sequence's own, which ends there, so no children). They
  // are unique now: each becomes an open leaf of its sequence again. Repeated suffixes are a
  // prefix of the pending list (by length), so the unique ones are its tail.
  void reopen_unique_pending() {
    for (i32 l = 0; l < i32(seqs_.size()); ++l) {
      Seq& L = seqs_[l];
      if (!L.live) continue;
      while (!L.pend.empty() && nodes_[L.pend.back()].count == 1) {
        const i32 v = L.pend.back();
        const i32 start = L.len - i32(L.pend.size());
        L.pend.pop_back();
        set_ref(v, l, start);
        nodes_[v].depth = OPEN;
        L.ends[start] = v;
        reopened_++;
      }
    }
  }

  // ---------------------------------------------------------------- queries
  inline i32 eff_depth(i32 v) const {
    const Node& V = nodes_[v];
    if (V.depth != OPEN) return V.depth;
    return std::min(D_, seqs_[V.ref_seq].len - V.ref_start);
  }
  inline i32 tok_at(i32 v, i32 d) const {  // token at 0-based position d of node v's string
    const Node& V = nodes_[v];
    return seqs_[V.ref_seq].tok[V.ref_start + d];
  }
  const Node& node(i32 v) const { return nodes_[v]; }

  // Locus of pattern[0:m]: node whose edge contains depth m. Returns NIL when absent.
  i32 match(const i32* p, i32 m) const {
    i32 v = ROOT, d = 0, ed = 0;
    for (i32 k = 0; k < m; ++k) {
      const i32 t = p[k];
      if (d == ed) {
        const i32 c = find_child(v, t);
        if (c == NIL) return NIL;
        v = c;
        ed = eff_depth(c);
      } else if (tok_at(v, d) != t) {
        return NIL;
      }
      ++d;
    }
    return v;
  }

  i64 count_pattern(const i32* p, i32 m) const {
    if (m <= 0 || m > D_) return 0;
    const i32 v = match(p, m);
    return v == NIL ? 0 : nodes_[v].count;
  }

  void draft_chain(i32 v, i32 m, i32 budget, double min_prob, DraftBuf& out) const {
    out.clear();
    if (budget <= 0) return;
    const double c0 = nodes_[v].count;
    i32 cur = v, d = m, ed = eff_depth(v);
    float pf = 1.0f;
    double pd = 1.0;
    while (i32(out.size()) < budget) {
      if (d < ed) {
        if (out.size() == 0) out.first_node = cur;
        out.tok.push_back(tok_at(cur, d));
        out.par.push_back(i32(out.size()) - 2);
        out.prob.push_back(pf);
        out.score += pd;
        ++d;
      } else {
        const i32 c = nodes_[cur].best;
        if (c == NIL) break;
        const double p = double(nodes_[c].count) / c0;
        if (p < min_prob) break;
        cur = c;
        ed = eff_depth(c);
        pd = p;
        pf = float(p);
      }
    }
  }

  void draft_tree(i32 v, i32 m, i32 budget, i32 max_rel_depth, double min_prob,
                  DraftBuf& out) {
    out.clear();
    if (budget <= 0 || max_rel_depth <= 0) return;
    const double c0 = nodes_[v].count;
    heap_.clear();
    HeapLess less;
    auto expand = [&](i32 node, i32 d, i32 par) {
      // position (node, d) was emitted (or is the locus): queue its children
      if (d < eff_depth(node)) {
        heap_.push_back(HeapItem{nodes_[node].count, par, 0, tok_at(node, d), node, d + 1});
        std::push_heap(heap_.begin(), heap_.end(), less);
        return;
      }
      for (i32 c = nodes_[node].first_child; c != NIL; c = nodes_[c].next_sib) {
        const Node& C = nodes_[c];
        if (double(C.count) / c0 >= min_prob) {
          heap_.push_back(HeapItem{C.count, par, C.rec, C.tok, c, d + 1});
          std::push_heap(heap_.begin(), heap_.end(), less);
        }
      }
    };
    expand(v, m, -1);
    while (!heap_.empty() && i32(out.size()) < budget) {
      std::pop_heap(heap_.begin(), heap_.end(), less);
      HeapItem it = heap_.back();
      heap_.pop_back();
      const double p = double(it.cnt) / c0;
      const float pf = float(p);
      i32 node = it.node, d = it.depth, par = it.par, tok = it.tok;
      const i32 ed = eff_depth(node);
      // Emit a run along the edge: the next position has the same count and the newest parent,
      // so it is always the next one best-first would pick.
      while (true) {
        if (out.size() == 0) out.first_node = node;
        out.tok.push_back(tok);
        out.par.push_back(par);
        out.prob.push_back(pf);
        out.score += p;
        par = i32(out.size()) - 1;
        if (i32(out.size()) >= budget || d - m >= max_rel_depth) break;
        if (d < ed) {
          tok = tok_at(node, d);
          ++d;
          continue;
        }
        expand(node, d, par);
        break;
      }
    }
  }

  // ---------------------------------------------------------------- accounting
  size_t live_bytes() const {
    size_t b = structure_bytes(0);
    for (const Seq& q : seqs_)
      if (q.used) b += (q.tok.size() + q.ends.size() + q.pend.size()) * sizeof(i32);
    return b;
  }
  // live_bytes without the per-sequence walk, for checks made on every append: nodes, child map
  // and `tokens` tokens with their suffix ends.
  size_t structure_bytes(i64 tokens) const {
    return live_nodes_ * sizeof(Node) + children_.size() * 2 * sizeof(ChildMap::Slot) +
           size_t(tokens) * 2 * sizeof(i32);
  }
  size_t allocated_bytes() const {
    size_t b = sizeof(*this) + nodes_.capacity() * sizeof(Node) + children_.capacity_bytes() +
               free_nodes_.capacity() * sizeof(i32) + seqs_.capacity() * sizeof(Seq) +
               pend2_.capacity() * sizeof(i32);
    for (const Seq& q : seqs_)
      b += (q.tok.capacity() + q.ends.capacity() + q.pend.capacity()) * sizeof(i32);
    return b;
  }
  size_t num_nodes() const { return live_nodes_; }

  // ---------------------------------------------------------------- integrity (tests)
  std::string check() const {
    size_t live = 0, edges = 0;
    std::vector<char> is_free(nodes_.size(), 0);
    for (i32 f : free_nodes_) is_free[f] = 1;
    for (i32 v = 0; v < i32(nodes_.size()); ++v) {
      if (is_free[v]) continue;
      ++live;
      const Node& V = nodes_[v];
      i64 sum = 0;
      i32 nch = 0, best = NIL, prev = NIL;
      for (i32 c = V.first_child; c != NIL; c = nodes_[c].next_sib) {
        const Node& C = nodes_[c];
        if (is_free[c]) return "freed child linked at node " + std::to_string(v);
        if (C.parent != v) return "bad parent pointer at node " + std::to_string(c);
        if (C.prev_sib != prev) return "bad sibling links at node " + std::to_string(c);
        if (find_child(v, C.tok) != c) return "child lookup mismatch at node " + std::to_string(c);
        if (!(V.nkids & HASHED) && children_.find(v, C.tok) != NIL)
          return "unhashed node with child map entry at " + std::to_string(c);
        if (V.nkids & HASHED) ++edges;
        const i32 pd = V.depth == OPEN ? -1 : eff_depth(v);
        if (tok_at(c, pd) != C.tok) return "edge token mismatch at node " + std::to_string(c);
        if (C.count <= 0) return "non-positive count at node " + std::to_string(c);
        if (C.count > V.count && v != ROOT) return "child count above parent at " + std::to_string(c);
        if (eff_depth(c) <= eff_depth(v)) return "child not deeper at " + std::to_string(c);
        if (eff_depth(c) > D_) return "node deeper than max depth " + std::to_string(c);
        if (best == NIL || better_child(C, nodes_[best])) best = c;
        if (!removable_ && C.rec > 0) return "bad recency at node " + std::to_string(c);
        if (removable_ && C.rec != 0) return "recency set in a removable tree";
        sum += C.count;
        ++nch;
        prev = c;
      }
      if (nch != (V.nkids & KIDS_MASK)) return "child count mismatch at node " + std::to_string(v);
      if (v != ROOT) {
        if (V.best != best) return "stale best child at node " + std::to_string(v);
        if (sum > V.count) return "children counts exceed count at node " + std::to_string(v);
        if (nch == 1 && sum == V.count) return "redundant node " + std::to_string(v);
        if (!seqs_[V.ref_seq].used) return "reference to a dead sequence at " + std::to_string(v);
        if (V.ref_start + eff_depth(v) > seqs_[V.ref_seq].len) return "reference out of range";
        if (V.depth == OPEN && V.count != 1) return "open node with count != 1";
      }
    }
    if (live != live_nodes_) return "live node count mismatch";
    if (edges != children_.size()) return "child map size mismatch";
    // Each live sequence's pending suffixes: the repeated suffixes of lengths 1..P, each ending
    // exactly at its node's boundary.
    for (i32 l = 0; l < i32(seqs_.size()); ++l) {
      const Seq& L = seqs_[l];
      if (!L.live) continue;
      if (i32(L.pend.size()) >= D_ || i32(L.pend.size()) > L.len)
        return "pending list too long for sequence " + std::to_string(l);
      for (i32 d = 1; d <= i32(L.pend.size()); ++d) {
        const i32 v = L.pend[d - 1];
        if (v == NIL || v <= ROOT || v >= i32(nodes_.size()) || is_free[v])
          return "bad pending node of sequence " + std::to_string(l);
        if (nodes_[v].depth == OPEN || eff_depth(v) != d || nodes_[v].count < 2)
          return "pending suffix not at a repeated node boundary, sequence " + std::to_string(l);
        for (i32 k = 0; k < d; ++k)
          if (tok_at(v, k) != L.tok[L.len - d + k])
            return "pending node's string is not the suffix, sequence " + std::to_string(l);
      }
    }
    return "";
  }

 private:
  i32 new_node() {
    live_nodes_++;
    if (!free_nodes_.empty()) {
      const i32 v = free_nodes_.back();
      free_nodes_.pop_back();
      return v;
    }
    nodes_.push_back(Node{});
    return i32(nodes_.size()) - 1;
  }
  void free_node(i32 v) {
    if (removable_) release_ref(v);
    nodes_[v].first_child = nodes_[v].next_sib = nodes_[v].prev_sib = nodes_[v].best = NIL;
    nodes_[v].count = 0;
    nodes_[v].nkids = 0;
    free_nodes_.push_back(v);
    live_nodes_--;
  }
  void release_ref(i32 v) {
    const i32 r = nodes_[v].ref_seq;
    if (r >= 0 && seqs_[r].rescue && --seqs_[r].refs == 0) {
      Seq& R = seqs_[r];
      std::vector<i32>().swap(R.tok);
      R.len = 0;
      R.used = false;
      R.rescue = false;
      free_seqs_.push_back(r);
    }
  }
  inline void set_ref(i32 v, i32 s, i32 start) {
    if (removable_) {
      if (seqs_[s].rescue) seqs_[s].refs++;
      if (nodes_[v].ref_seq >= 0) release_ref(v);
    }
    nodes_[v].ref_seq = s;
    nodes_[v].ref_start = start;
  }
  inline void consider_best(i32 p, i32 c) {
    Node& P = nodes_[p];
    const i32 b = P.best;
    if (b == NIL || better_child(nodes_[c], nodes_[b])) P.best = c;
  }
  void recompute_best(i32 p) {
    i32 best = NIL;
    for (i32 c = nodes_[p].first_child; c != NIL; c = nodes_[c].next_sib)
      if (best == NIL || better_child(nodes_[c], nodes_[best])) best = c;
    nodes_[p].best = best;
  }
  inline void link_child(i32 p, i32 c) {
    Node& P = nodes_[p];
    Node& C = nodes_[c];
    C.parent = p;
    C.prev_sib = NIL;
    C.next_sib = P.first_child;
    if (P.first_child != NIL) nodes_[P.first_child].prev_sib = c;
    P.first_child = c;
    P.nkids += 1;
    if (P.nkids & HASHED) {
      children_.insert(p, C.tok, c);
    } else if (P.nkids > HASH_AT) {
      P.nkids |= HASHED;
      for (i32 k = P.first_child; k != NIL; k = nodes_[k].next_sib) children_.insert(p, nodes_[k].tok, k);
    }
  }
  inline i32 find_child(i32 p, i32 t) const {
    const Node& P = nodes_[p];
    if (P.nkids & HASHED) return children_.find(p, t);
    for (i32 c = P.first_child; c != NIL; c = nodes_[c].next_sib)
      if (nodes_[c].tok == t) return c;
    return NIL;
  }
  inline void prefetch_child(i32 p, i32 t) const {
    const Node& P = nodes_[p];
    if (P.nkids & HASHED)
      children_.prefetch(p, t);
    else if (P.first_child != NIL)
      __builtin_prefetch(&nodes_[P.first_child]);
  }
  void unlink_child(i32 p, i32 c) {
    Node& C = nodes_[c];
    if (C.prev_sib != NIL)
      nodes_[C.prev_sib].next_sib = C.next_sib;
    else
      nodes_[p].first_child = C.next_sib;
    if (C.next_sib != NIL) nodes_[C.next_sib].prev_sib = C.prev_sib;
    nodes_[p].nkids -= 1;
    if (nodes_[p].nkids & HASHED) children_.erase(p, C.tok);
    if (nodes_[p].best == c) recompute_best(p);
  }
  // nw takes old's place among p's children; nw.tok must equal old.tok.
  inline void replace_child(i32 p, i32 old, i32 nw) {
    Node& O = nodes_[old];
    Node& N = nodes_[nw];
    N.parent = p;
    N.prev_sib = O.prev_sib;
    N.next_sib = O.next_sib;
    if (O.prev_sib != NIL)
      nodes_[O.prev_sib].next_sib = nw;
    else
      nodes_[p].first_child = nw;
    if (O.next_sib != NIL) nodes_[O.next_sib].prev_sib = nw;
    if (nodes_[p].nkids & HASHED) children_.assign(p, O.tok, nw);
    if (nodes_[p].best == old) nodes_[p].best = nw;
  }
  // Node v (single child c with the same count) disappears; c takes its place.
  void absorb(i32 v, i32 c) {
    const i32 p = nodes_[v].parent;
    if (nodes_[v].nkids & HASHED) children_.erase(v, nodes_[c].tok);
    nodes_[c].tok = nodes_[v].tok;
    replace_child(p, v, c);
    free_node(v);
  }

  // One pending suffix (ending at node w, depth dw, start i of sequence s) reads token t.
  // Returns the node where the extended suffix ends, or the new leaf (leaf = true).
  i32 step(i32 w, i32 dw, i32 t, i32 s, i32 i, bool& leaf) {
    const i32 c = find_child(w, t);
    if (c == NIL) {
      const i32 x = new_node();
      Node& X = nodes_[x];
      X.nkids = 0;
      X.depth = OPEN;
      X.count = 1;
      X.rec = removable_ ? 0 : -i;  // a new leaf: its only occurrence starts at i
      X.ref_seq = NIL;
      X.tok = t;
      X.first_child = NIL;
      X.best = NIL;
      set_ref(x, s, i);
      link_child(w, x);
      if (w != ROOT) consider_best(w, x);
      leaf = true;
      return x;
    }
    const i32 cd = eff_depth(c);
    if (cd == dw + 1) {
      if (nodes_[c].depth == OPEN) adopt_open_leaf(c, cd, s);
      nodes_[c].count += 1;
      // (arrivals are newer than the first occurrence: rec unchanged)
      nodes_[c].depth = cd;  // an open leaf stops growing once a second occurrence ends there
      if (w != ROOT) {
        consider_best(w, c);
        if (nodes_[w].count == nodes_[c].count) absorb(w, c);
      }
      return c;
    }
    if (w != ROOT && nodes_[w].count == nodes_[c].count + 1 && nodes_[w].first_child == c &&
        nodes_[c].next_sib == NIL) {
      // w only exists for this suffix: move its boundary one token down into c.
      const i32 ntok = tok_at(c, dw + 1);
      const bool hashed = nodes_[w].nkids & HASHED;
      if (hashed) children_.erase(w, t);
      Node& W = nodes_[w];
      W.depth = dw + 1;
      set_ref(w, nodes_[c].ref_seq, nodes_[c].ref_start);
      nodes_[c].tok = ntok;
      if (hashed) children_.insert(w, ntok, c);
      return w;
    }
    // Split c at depth dw + 1.
    const i32 x = new_node();
    {
      Node& X = nodes_[x];
      const Node& C = nodes_[c];
      X.depth = dw + 1;
      X.count = C.count + 1;
      X.rec = C.rec;  // occurrences of c plus a newer one
      X.ref_seq = NIL;
      X.tok = t;
      X.first_child = c;
      X.best = c;
      X.nkids = 1;
    }
    set_ref(x, nodes_[c].ref_seq, nodes_[c].ref_start);
    replace_child(w, c, x);
    Node& C = nodes_[c];
    C.parent = x;
    C.prev_sib = NIL;
    C.next_sib = NIL;
    C.tok = tok_at(c, dw + 1);
    if (w != ROOT) consider_best(w, x);
    return x;
  }

  // Leaf c (depth cd) stops growing because a suffix of sequence s now ends there too. When c
  // is the unique suffix of another live sequence that ends at that sequence's current end, the
  // suffix is now repeated: it becomes the owner's pending suffix of length cd (suffixes at the
  // depth cap are never pending).
  void adopt_open_leaf(i32 c, i32 cd, i32 s) {
    const Node& C = nodes_[c];
    const i32 o = C.ref_seq;
    if (o == s || !seqs_[o].live || cd >= D_ || seqs_[o].len - C.ref_start != cd) return;
    std::vector<i32>& op = seqs_[o].pend;
    if (i32(op.size()) < cd) op.resize(cd, NIL);
    op[cd - 1] = c;
    adopted_++;
  }

 public:
  i64 adopted() const { return adopted_; }  // leaves adopted as pending suffixes (tests)
  i64 reopened() const { return reopened_; }  // pending suffixes made open leaves again (tests)

 private:

  int D_;
  bool removable_;
  std::vector<Node> nodes_;
  std::vector<i32> free_nodes_;
  size_t live_nodes_ = 0;
  ChildMap children_;
  std::vector<Seq> seqs_;
  std::vector<i32> free_seqs_;
  i32 num_used_seqs_ = 0;
  std::vector<i32> pend2_;  // scratch of append_next
  i64 adopted_ = 0;
  i64 reopened_ = 0;
  std::vector<HeapItem> heap_;
  std::vector<i32> visit_;
  std::vector<u64> order_;
};

// ------------------------------------------------------------------------------------ Core
struct Request {
  std::unique_ptr<Tree> tree;
  i32 prompt_len = 0;
  i32 live_seq = -1;  // its output's sequence in the global tree while it generates (live outputs)
};

class Core {
 public:
  Core(int max_depth, i64 vocab_size)
      : D_(max_depth), vocab_(vocab_size), global_(max_depth, true) {
    if (max_depth < 1 || max_depth > 4096)
      throw std::invalid_argument("max_depth must be in [1, 4096], got " + std::to_string(max_depth));
    if (vocab_size < 1 || vocab_size > (i64(1) << 31) - 1)
      throw std::invalid_argument("vocab_size must be in [1, 2**31 - 1]");
  }

  int max_depth() const { return D_; }
  i64 vocab_size() const { return vocab_; }

  // Live outputs: each request's output joins the global tree as it is generated (other requests
  // draft from it at once), while the global tree's structure stays under `budget_bytes`; past
  // it, outputs catch up when their request finishes (and the caller evicts).
  void set_live_outputs(bool on, i64 budget_bytes) {
    if (budget_bytes < 0) throw std::invalid_argument("budget_bytes must be >= 0");
    live_ = on;
    live_budget_ = budget_bytes;
  }
  bool live_outputs() const { return live_; }

  i32 start_request(py::handle tokens) {
    std::vector<i32> buf;
    read_tokens(tokens, buf, "prompt_ids");
    if (buf.empty()) throw std::invalid_argument("prompt_ids must not be empty");
    i32 h;
    if (!free_handles_.empty()) {
      h = free_handles_.back();
      free_handles_.pop_back();
    } else {
      h = i32(reqs_.size());
      reqs_.emplace_back();
    }
    Request& r = reqs_[h];
    r.tree.reset(new Tree(D_, false));
    const i32 s = r.tree->new_seq();
    r.tree->reserve(buf.size());
    Seq& q = r.tree->seq_mut(s);
    q.tok = std::move(buf);
    q.tok.reserve(q.tok.size() + 256);
    r.prompt_len = i32(q.tok.size());
    const i32 n = i32(q.tok.size());
    // The GIL stays held: the index is not thread-safe, and other threads must not touch it.
    for (i32 k = 0; k < n; ++k) r.tree->append_next(s);
    r.live_seq = -1;
    num_active_++;
    return h;
  }

  void extend(i32 h, py::handle tokens) {
    Request& r = req(h);
    read_tokens(tokens, tmp_, "new_ids");
    if (tmp_.empty()) throw std::invalid_argument("new_ids must not be empty");
    Seq& q = r.tree->seq_mut(0);
    if (q.tok.size() + tmp_.size() > size_t(std::numeric_limits<i32>::max() / 2))
      throw std::invalid_argument("request sequence too long");
    q.tok.insert(q.tok.end(), tmp_.begin(), tmp_.end());
    const i32 n = i32(q.tok.size());
    while (q.len < n) r.tree->append_next(0);
    if (live_ && global_.structure_bytes(global_tokens_) <= size_t(live_budget_)) share_output(r);
  }

  i32 request_len(i32 h) { return req(h).tree->seq(0).len; }
  i32 prompt_len(i32 h) { return req(h).prompt_len; }

  py::array_t<i64> request_tokens(i32 h) {
    const Seq& q = req(h).tree->seq(0);
    py::array_t<i64> out(q.len);
    auto o = out.mutable_unchecked<1>();
    for (i32 i = 0; i < q.len; ++i) o(i) = q.tok[i];
    return out;
  }

  // Drops the request; when keep is true its output goes into the global tree. Returns the
  // global sequence id, or -1 when nothing was kept.
  i32 finish_request(i32 h, bool keep) {
    Request& r = req(h);
    i32 s = -1;
    if (keep) {  // the rest of the output (all of it without live outputs) joins the global tree
      share_output(r);
      s = r.live_seq;
      if (s >= 0) global_.finalize(s);
    } else if (r.live_seq >= 0) {  // roll the live output back
      global_tokens_ -= global_.seq(r.live_seq).len;
      global_.remove_seq(r.live_seq);
    }
    r.tree.reset();
    free_handles_.push_back(h);
    num_active_--;
    return s;
  }

  // Inserts a token sequence directly into the global tree (tests, warm start).
  i32 global_insert(py::handle tokens) {
    std::vector<i32> buf;
    read_tokens(tokens, buf, "token_ids");
    if (buf.empty()) throw std::invalid_argument("token_ids must not be empty");
    const i32 s = global_.new_seq();
    global_append(s, buf.data(), buf.data() + buf.size());
    global_.finalize(s);
    return s;
  }

  void global_remove(i32 s) {
    if (!global_.is_response(s) || global_.is_live(s))
      throw std::invalid_argument("unknown global sequence id " + std::to_string(s) +
                                  " (or the live output of an active request)");
    global_tokens_ -= global_.seq(s).len;
    global_.remove_seq(s);
  }

  py::tuple speculate(i32 h, i32 max_spec_tokens, double factor, double offset, double min_prob,
                      bool use_tree, i32 max_tree_nodes, bool use_global) {
    Request& r = req(h);
    const SpecParams sp = spec_params(max_spec_tokens, factor, offset, min_prob, use_tree,
                                      max_tree_nodes);
    best_.clear();
    best_m_ = 0;
    best_tree_ = -1;
    Tree& rt = *r.tree;
    // Request tree: the loci of the repeated context suffixes are its pending suffixes.
    {
      const std::vector<i32>& pend = rt.pending(0);
      for (i32 m = i32(pend.size()); m >= 1; --m) {
        const i32 v = pend[m - 1];
        consider(rt, v, m, sp, 0, /*self=*/true);
      }
    }
    if (use_global && global_.num_seqs() > 0) {
      const Seq& q = rt.seq(0);
      consider_global(q.tok.data() + q.len, q.len, sp);
    }
    return best_tuple();
  }

  // Draft a continuation of `context` (its last max_depth tokens are enough) from the global tree
  // alone: a corpus kept in its own Core has no request of its own.
  py::tuple speculate_context(py::handle context, i32 max_spec_tokens, double factor,
                              double offset, double min_prob, bool use_tree, i32 max_tree_nodes) {
    const SpecParams sp = spec_params(max_spec_tokens, factor, offset, min_prob, use_tree,
                                      max_tree_nodes);
    read_tokens(context, ctx_buf_, "context");
    best_.clear();
    best_m_ = 0;
    best_tree_ = -1;
    if (global_.num_seqs() > 0 && !ctx_buf_.empty())
      consider_global(ctx_buf_.data() + ctx_buf_.size(), i32(ctx_buf_.size()), sp);
    return best_tuple();
  }

 private:
  SpecParams spec_params(i32 max_spec_tokens, double factor, double offset, double min_prob,
                         bool use_tree, i32 max_tree_nodes) const {
    if (max_spec_tokens < 0 || max_spec_tokens > 65536)
      throw std::invalid_argument("max_spec_tokens must be in [0, 65536], got " +
                                  std::to_string(max_spec_tokens));
    if (max_tree_nodes < 0 || max_tree_nodes > 65536)
      throw std::invalid_argument("max_tree_nodes must be in [0, 65536], got " +
                                  std::to_string(max_tree_nodes));
    if (!std::isfinite(factor) || factor < 0.0 || factor > 1e6)
      throw std::invalid_argument("spec_factor must be finite and in [0, 1e6]");
    if (!std::isfinite(offset) || std::fabs(offset) > 1e6)
      throw std::invalid_argument("spec_offset must be finite and in [-1e6, 1e6]");
    if (!(min_prob >= 0.0 && min_prob <= 1.0))
      throw std::invalid_argument("min_token_prob must be in [0, 1]");
    return SpecParams{max_spec_tokens, factor, offset, min_prob, use_tree, max_tree_nodes};
  }

  // ctx_end - n .. ctx_end: the context; its suffixes are matched from the global tree's root.
  void consider_global(const i32* ctx_end, i32 n, const SpecParams& sp) {
    const i32 Mmax = std::min(n, D_);
    loci_.clear();
    for (i32 m = 1; m <= Mmax; ++m) {
      const i32 v = global_.match(ctx_end - m, m);
      if (v == NIL) break;
      loci_.push_back(v);
    }
    for (i32 m = i32(loci_.size()); m >= 1; --m) consider(global_, loci_[m - 1], m, sp, 1, false);
  }

  py::tuple best_tuple() {
    const py::ssize_t k = py::ssize_t(best_.size());
    if (!dt_i64_) {
      dt_i64_ = py::dtype::of<i64>();
      dt_i32_ = py::dtype::of<i32>();
      dt_f32_ = py::dtype::of<float>();
    }
    py::array tok(dt_i64_, {k}, {});
    py::array par(dt_i32_, {k}, {});
    py::array prob(dt_f32_, {k}, {});
    if (k) {
      i64* t = static_cast<i64*>(tok.mutable_data());
      for (py::ssize_t i = 0; i < k; ++i) t[i] = best_.tok[i];
      std::memcpy(par.mutable_data(), best_.par.data(), size_t(k) * sizeof(i32));
      std::memcpy(prob.mutable_data(), best_.prob.data(), size_t(k) * sizeof(float));
    }
    i32 ref_seq = -1;
    if (k && best_tree_ == 1) ref_seq = global_.node(best_.first_node).ref_seq;
    return py::make_tuple(tok, par, prob, best_.score, k ? best_m_ : 0, k ? best_tree_ : -1,
                          ref_seq);
  }

 public:

  // ---------------------------------------------------------------- stats / debug
  size_t memory_bytes() const {
    size_t b = global_.live_bytes();
    for (const Request& r : reqs_)
      if (r.tree) b += r.tree->live_bytes();
    return b;
  }
  size_t allocated_bytes() const {
    size_t b = global_.allocated_bytes();
    for (const Request& r : reqs_)
      if (r.tree) b += r.tree->allocated_bytes();
    return b;
  }
  size_t global_bytes() const { return global_.live_bytes(); }
  size_t request_bytes(i32 h) { return req(h).tree->live_bytes(); }
  size_t request_allocated_bytes(i32 h) { return req(h).tree->allocated_bytes(); }
  i64 global_tokens() const { return global_tokens_; }
  i32 num_global_seqs() const { return global_.num_seqs(); }
  i32 num_active() const { return num_active_; }
  size_t request_nodes(i32 h) { return req(h).tree->num_nodes(); }
  size_t global_nodes() const { return global_.num_nodes(); }
  i64 global_adopted() const { return global_.adopted(); }
  i64 global_reopened() const { return global_.reopened(); }

  i64 count(i32 h, py::handle pattern) {
    std::vector<i32> buf;
    read_tokens(pattern, buf, "pattern");
    const Tree& t = (h < 0) ? global_ : *req(h).tree;
    return t.count_pattern(buf.data(), i32(buf.size()));
  }

  std::string check(i32 h) {
    const Tree& t = (h < 0) ? global_ : *req(h).tree;
    return t.check();
  }

 private:
  // Appends the request's output tokens not yet in the global tree to its live sequence.
  void share_output(Request& r) {
    const Seq& q = r.tree->seq(0);
    i32 done = 0;
    if (r.live_seq >= 0) {
      done = global_.seq(r.live_seq).len;
    } else if (q.len > r.prompt_len) {
      r.live_seq = global_.new_seq();
    }
    if (r.live_seq < 0 || done >= q.len - r.prompt_len) return;
    const i32* out = q.tok.data() + r.prompt_len;
    global_append(r.live_seq, out + done, q.tok.data() + q.len);
  }

  // Appends tokens [first, last) to the live global sequence s.
  void global_append(i32 s, const i32* first, const i32* last) {
    const i32 k = i32(last - first);
    Seq& g = global_.seq_mut(s);
    g.tok.insert(g.tok.end(), first, last);
    g.ends.resize(g.tok.size(), NIL);
    global_.reserve(k);
    for (i32 j = 0; j < k; ++j) global_.append_next(s);
    global_tokens_ += k;
  }

  Request& req(i32 h) {
    if (h < 0 || h >= i32(reqs_.size()) || !reqs_[h].tree)
      throw std::invalid_argument("unknown request handle " + std::to_string(h));
    return reqs_[h];
  }

  void consider(Tree& t, i32 v, i32 m, const SpecParams& sp, i32 tree_id, bool self) {
    const i32 c0 = t.node(v).count;
    i32 budget, levels;
    if (sp.use_tree) {
      budget = budget_for(m, sp.factor, sp.offset, sp.max_tree_nodes);
      levels = std::min(D_ - m, sp.max_spec_tokens);
    } else {
      budget = budget_for(m, sp.factor, sp.offset, sp.max_spec_tokens);
      levels = D_ - m;
    }
    const i32 k = std::min(budget, levels);
    if (k <= 0) return;
    // Upper bound on the score: at most k levels, each holding at most (c0 - self) / c0.
    double ub = double(k);
    if (self) ub = double(k) * (double(c0 - 1) / double(c0));
    ub += 1e-9 * (k + 1);
    if (ub < best_.score) return;
    if (sp.use_tree)
      t.draft_tree(v, m, budget, sp.max_spec_tokens, sp.min_prob, cand_);
    else
      t.draft_chain(v, m, budget, sp.min_prob, cand_);
    if (cand_.size() == 0) return;
    if (cand_.score > best_.score || (cand_.score == best_.score && m > best_m_)) {
      best_.swap(cand_);
      best_m_ = m;
      best_tree_ = tree_id;
    }
  }

  template <typename T>
  void copy_checked(const py::array& a, std::vector<i32>& out, const char* what) {
    const py::ssize_t n = a.shape(0);
    const py::ssize_t stride = a.strides(0);
    const char* base = static_cast<const char*>(a.data());
    out.resize(size_t(n));
    bool bad = false;
    for (py::ssize_t i = 0; i < n; ++i) {
      const T x = *reinterpret_cast<const T*>(base + i * stride);
      if constexpr (std::is_signed<T>::value) {
        if (x < 0 || i64(x) >= vocab_) bad = true;
      } else {
        if (u64(x) >= u64(vocab_)) bad = true;
      }
      out[size_t(i)] = i32(x);
    }
    if (bad) {
      for (py::ssize_t i = 0; i < n; ++i) {
        const T x = *reinterpret_cast<const T*>(base + i * stride);
        bool b;
        if constexpr (std::is_signed<T>::value)
          b = x < 0 || i64(x) >= vocab_;
        else
          b = u64(x) >= u64(vocab_);
        if (b)
          throw std::invalid_argument(std::string(what) + ": token id " + std::to_string(i64(x)) +
                                      " at position " + std::to_string(i) + " is outside [0, " +
                                      std::to_string(vocab_) + ")");
      }
    }
  }

  void read_tokens(py::handle obj, std::vector<i32>& out, const char* what) {
    out.clear();
    if (py::isinstance<py::array>(obj)) {
      py::array a = py::reinterpret_borrow<py::array>(obj);
      if (a.ndim() != 1)
        throw std::invalid_argument(std::string(what) + " must be 1-D, got ndim=" +
                                    std::to_string(a.ndim()));
      const char kind = a.dtype().kind();
      const py::ssize_t isz = a.itemsize();
      if (kind == 'i') {
        if (isz == 8) return copy_checked<int64_t>(a, out, what);
        if (isz == 4) return copy_checked<int32_t>(a, out, what);
        if (isz == 2) return copy_checked<int16_t>(a, out, what);
        if (isz == 1) return copy_checked<int8_t>(a, out, what);
      } else if (kind == 'u') {
        if (isz == 8) return copy_checked<uint64_t>(a, out, what);
        if (isz == 4) return copy_checked<uint32_t>(a, out, what);
        if (isz == 2) return copy_checked<uint16_t>(a, out, what);
        if (isz == 1) return copy_checked<uint8_t>(a, out, what);
      }
      throw std::invalid_argument(std::string(what) + " must hold integers, got dtype " +
                                  std::string(py::str(a.dtype())));
    }
    if (py::isinstance<py::list>(obj) || py::isinstance<py::tuple>(obj)) {
      py::sequence seq = py::reinterpret_borrow<py::sequence>(obj);
      const size_t n = py::len(seq);
      out.resize(n);
      for (size_t i = 0; i < n; ++i) {
        PyObject* item = PySequence_GetItem(seq.ptr(), Py_ssize_t(i));
        if (!item) throw py::error_already_set();
        py::object holder = py::reinterpret_steal<py::object>(item);
        if (PyBool_Check(item) || PyFloat_Check(item))
          throw std::invalid_argument(std::string(what) + ": item " + std::to_string(i) +
                                      " is not an integer token id");
        int overflow = 0;
        PyObject* idx = PyNumber_Index(item);
        if (!idx) {
          PyErr_Clear();
          throw std::invalid_argument(std::string(what) + ": item " + std::to_string(i) +
                                      " is not an integer token id");
        }
        const long long x = PyLong_AsLongLongAndOverflow(idx, &overflow);
        Py_DECREF(idx);
        if (overflow || x < 0 || x >= vocab_)
          throw std::invalid_argument(std::string(what) + ": token id at position " +
                                      std::to_string(i) + " is outside [0, " +
                                      std::to_string(vocab_) + ")");
        out[i] = i32(x);
      }
      return;
    }
    throw std::invalid_argument(std::string(what) +
                                " must be a 1-D integer numpy array, list or tuple");
  }

  int D_;
  i64 vocab_;
  Tree global_;
  std::vector<Request> reqs_;
  std::vector<i32> free_handles_;
  i32 num_active_ = 0;
  i64 global_tokens_ = 0;
  bool live_ = false;
  i64 live_budget_ = 0;
  std::vector<i32> tmp_;
  std::vector<i32> loci_;
  std::vector<i32> ctx_buf_;  // speculate_context's copy of the context
  DraftBuf best_, cand_;
  py::dtype dt_i64_, dt_i32_, dt_f32_;
  i32 best_m_ = 0;
  i32 best_tree_ = -1;
};

}  // namespace lsx

PYBIND11_MODULE(_suffix_core, m) {
  m.doc() = "Compiled suffix-tree draft index (see sgl_longspec.drafters.suffix_index)";
  m.attr("__version__") = "1";
  py::class_<lsx::Core>(m, "Core")
      .def(py::init<int, int64_t>(), py::arg("max_depth"), py::arg("vocab_size"))
      .def_property_readonly("max_depth", &lsx::Core::max_depth)
      .def_property_readonly("vocab_size", &lsx::Core::vocab_size)
      .def("start_request", &lsx::Core::start_request)
      .def("extend", &lsx::Core::extend)
      .def("request_len", &lsx::Core::request_len)
      .def("prompt_len", &lsx::Core::prompt_len)
      .def("request_tokens", &lsx::Core::request_tokens)
      .def("finish_request", &lsx::Core::finish_request)
      .def("set_live_outputs", &lsx::Core::set_live_outputs)
      .def_property_readonly("live_outputs", &lsx::Core::live_outputs)
      .def("global_insert", &lsx::Core::global_insert)
      .def("global_remove", &lsx::Core::global_remove)
      .def("speculate", &lsx::Core::speculate)
      .def("speculate_context", &lsx::Core::speculate_context)
      .def("memory_bytes", &lsx::Core::memory_bytes)
      .def("allocated_bytes", &lsx::Core::allocated_bytes)
      .def("global_bytes", &lsx::Core::global_bytes)
      .def("request_bytes", &lsx::Core::request_bytes)
      .def("request_allocated_bytes", &lsx::Core::request_allocated_bytes)
      .def("global_tokens", &lsx::Core::global_tokens)
      .def("num_global_seqs", &lsx::Core::num_global_seqs)
      .def("num_active", &lsx::Core::num_active)
      .def("request_nodes", &lsx::Core::request_nodes)
      .def("global_nodes", &lsx::Core::global_nodes)
      .def("global_adopted", &lsx::Core::global_adopted)
      .def("global_reopened", &lsx::Core::global_reopened)
      .def("count", &lsx::Core::count)
      .def("check", &lsx::Core::check);
}
