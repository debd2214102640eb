// permute.wgsl — stage 2: the canonical stable counting sort of the N = T·slots assignments by
// bucket (key of assignment i = topk_ids[i] if kept[i] != 0, else E: the dropped bucket after
// every expert), and the gather x_perm[r] = x[sorted_assignment[r] / slots] for every row r.
//
// Mirrors: src/cpu/permute.rs `permute` (expert_offsets, sorted_assignment, row_of_assignment)
//   and `gather` (x_perm), bit-exact. No atomics anywhere: row order is fixed by construction,
//   and the gather copies the bits of x's elements (bound as u32 words), so x_perm is bitwise x
//   in any activation dtype.
//
// Activation layout (src/wgpu/act.rs): x is the caller's [T, H] with row stride x_stride
//   elements (H: dense); x_perm [N, H] has the padded stride (H for f32, H rounded up to even
//   for f16 / bf16, whose elements are two per word, element 2i in the low half). A row of
//   x_perm is `dst_words` words; the padding element of an odd-H 16-bit row is written as 0.
//
// Algorithm (a blocked counting sort). A block is CHUNK = 256 consecutive assignments;
//   NB = max(1, ceil(N / CHUNK)) blocks; the table `cells` has (E + 1) · NB entries, cell
//   (b, blk) at b · NB + blk (bucket-major).
//   0. host: clear_buffer(cells) (cells with no assignment stay 0).
//   1. permute_rank: for each assignment, its rank among the earlier same-bucket assignments
//      of its block → local_rank[i]; the last one of each bucket in the block writes the
//      bucket's count in the block to cells[b · NB + blk].
//   2. permute_scan_reduce, permute_scan_tiles, permute_scan_down: exclusive prefix sum of
//      cells in place, in bucket-major order (tiles of TILE = 1024 cells), so cells[b·NB + blk]
//      is the first row of block blk's assignments in bucket b; expert_offsets[b] = cells[b·NB]
//      for b = 0..E (offsets[E] = kept rows).
//   3. permute_place: row = cells[key · NB + i / CHUNK] + local_rank[i]; sorted[row] = i and
//      row_of[i] = row (a permutation, stable within each bucket).
//   4. x_perm[r, h] = x[sorted[r] / slots, h], one of (chosen on the host):
//      permute_gather    word copy: f32, or 16-bit rows that start on a word in x (H and
//                        x_stride even); row_words words per row, src_words / dst_words apart
//      permute_gather4   the same, four words at a time (row_words, src_words and dst_words
//                        multiples of 4)
//      permute_gather16  16-bit x with odd H or odd x_stride (elements straddle words of x):
//                        one output word = two elements, each extracted from its word of x
//
// Parameters (group 0; binding 0 is `p` for every entry point; the other bindings differ per
// entry point and are numbered 1, 2, … in the order listed):
//   0 p            uniform  PermuteParams (below)
//   permute_rank:
//     1 ids         storage read        u32 [N]          topk_ids, token-major
//     2 kept        storage read        u32 [N]          1 where kept
//     3 cells       storage read_write  u32 [(E+1)·NB]   out: per-(bucket, block) counts
//                                                        (cleared to 0 beforehand)
//     4 local_rank  storage read_write  u32 [N]          out: rank within bucket and block
//   permute_scan_reduce:
//     1 cells       storage read_write  u32 [(E+1)·NB]   in: counts (read only here)
//     2 tile_sums   storage read_write  u32 [TILES]      out: sum of each tile
//   permute_scan_tiles:
//     1 tile_sums   storage read_write  u32 [TILES]      in: sums, out: exclusive prefix sums
//   permute_scan_down:
//     1 cells       storage read_write  u32 [(E+1)·NB]   in: counts, out: exclusive prefix sums
//     2 tile_sums   storage read_write  u32 [TILES]      in: exclusive prefix of tile sums
//     3 offsets     storage read_write  u32 [E+1]        out: expert_offsets
//   permute_place:
//     1 ids, 2 kept as permute_rank
//     3 cells       storage read_write  u32 [(E+1)·NB]   in: bases (read only here)
//     4 local_rank  storage read_write  u32 [N]          in (read only here)
//     5 sorted      storage read_write  u32 [N]          out: sorted_assignment
//     6 row_of      storage read_write  u32 [N]          out: row_of_assignment
//   permute_gather, permute_gather16:
//     1 x           storage read        u32 words of x [T, H] (row stride x_stride elements)
//     2 sorted      storage read        u32 [N]          sorted_assignment
//     3 x_perm      storage read_write  u32 words of x_perm [N, H] (dst_words per row), out
//   permute_gather4: as permute_gather with x and x_perm bound as vec4<u32>.
// Overrides: A_DTYPE (common.wgsl), used by permute_gather16 only (1 f16, 2 bf16: the copy is
//   bitwise either way).
//
// Launch (grid(n, per) = ceil(n / per) workgroups on a 2-D grid, flattened x first):
//   permute_rank          grid(NB · CHUNK, CHUNK), workgroup 256; one workgroup per block
//   permute_scan_reduce   grid(CELLS, TILE), workgroup 256 (4 cells each); one per tile
//   permute_scan_tiles    (1, 1, 1), workgroup 256; loops over the tile sums in TILE steps
//   permute_scan_down     grid(CELLS, TILE), workgroup 256; one per tile
//   permute_place         grid(N, 64), workgroup 64; one invocation per assignment
//   permute_gather        grid(N · row_words, 64), workgroup 64; one invocation per word
//   permute_gather4       grid(N · row_words/4, 64), workgroup 64; one per 4 words
//   permute_gather16      grid(N · dst_words, 64), workgroup 64; one per output word
//   Workgroups and invocations past the end exit. Workgroup memory: 1 KiB per entry point.
// Target: WGSL core, no extensions, any subgroup size.

const CHUNK: u32 = 256u;    // assignments per block = workgroup size of permute_rank
const SCAN_WG: u32 = 256u;  // workgroup size of the scan entry points
const PER: u32 = 4u;        // consecutive cells per scan invocation
const TILE: u32 = 1024u;    // SCAN_WG · PER cells per scan workgroup
const NONE: u32 = 0xffffffffu;

struct PermuteParams {
    assignments: u32,  // N = T · slots
    slots: u32,
    experts: u32,      // E; bucket E holds the dropped assignments
    hidden: u32,       // H
    blocks: u32,       // NB
    cells: u32,        // CELLS = (E + 1) · NB
    tiles: u32,        // TILES = ceil(CELLS / TILE)
    x_stride: u32,     // elements between rows of x (permute_gather16)
    row_words: u32,    // words copied per row (permute_gather, permute_gather4)
    src_words: u32,    // words between rows of x (permute_gather, permute_gather4)
    dst_words: u32,    // words between rows of x_perm
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: PermuteParams;

// permute_rank, permute_place
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read> kept: array<u32>;
@group(0) @binding(3) var<storage, read_write> cells: array<u32>;
@group(0) @binding(4) var<storage, read_write> local_rank: array<u32>;
@group(0) @binding(5) var<storage, read_write> sorted: array<u32>;
@group(0) @binding(6) var<storage, read_write> row_of: array<u32>;

// permute_scan_reduce, permute_scan_down (cells, then tile sums, then offsets)
@group(0) @binding(1) var<storage, read_write> scan_cells: array<u32>;
@group(0) @binding(2) var<storage, read_write> scan_tiles: array<u32>;
@group(0) @binding(3) var<storage, read_write> offsets: array<u32>;

// permute_scan_tiles
@group(0) @binding(1) var<storage, read_write> tile_sums: array<u32>;

// permute_gather
@group(0) @binding(1) var<storage, read> gx: array<u32>;
@group(0) @binding(2) var<storage, read> g_sorted: array<u32>;
@group(0) @binding(3) var<storage, read_write> gx_perm: array<u32>;

// permute_gather4
@group(0) @binding(1) var<storage, read> gx4: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read_write> gx_perm4: array<vec4<u32>>;

var<workgroup> keys: array<u32, CHUNK>;
var<workgroup> scan_buf: array<u32, SCAN_WG>;

// Bucket of assignment i: its expert if kept, else E. (Ids ≥ E are rejected on the host; here
// they are clamped into the dropped bucket so that no write leaves its table.)
fn bucket_of(i: u32) -> u32 {
    if (kept[i] != 0u) {
        return min(ids[i], p.experts);
    }
    return p.experts;
}

// Inclusive scan of `v` over the workgroup's SCAN_WG invocations (Hillis–Steele): returns
// (inclusive prefix at lid, workgroup total). Call from uniform control flow.
fn wg_scan(lid: u32, v: u32) -> vec2<u32> {
    scan_buf[lid] = v;
    workgroupBarrier();
    for (var off = 1u; off < SCAN_WG; off <<= 1u) {
        var s = scan_buf[lid];
        if (lid >= off) {
            s += scan_buf[lid - off];
        }
        workgroupBarrier();
        scan_buf[lid] = s;
        workgroupBarrier();
    }
    let out = vec2<u32>(scan_buf[lid], scan_buf[SCAN_WG - 1u]);
    workgroupBarrier();
    return out;
}

@compute @workgroup_size(256)
fn permute_rank(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let blk = wid.x + wid.y * nwg.x;
    if (blk >= p.blocks) {
        return;
    }
    let i = blk * CHUNK + lid;
    var key = NONE;
    if (i < p.assignments) {
        key = bucket_of(i);
    }
    keys[lid] = key;
    workgroupBarrier();
    if (key == NONE) {
        return;
    }
    var rank = 0u;
    var last = true;
    for (var j = 0u; j < CHUNK; j++) {
        if (keys[j] == key) {
            if (j < lid) {
                rank += 1u;
            } else if (j > lid) {
                last = false;
                break;
            }
        }
    }
    local_rank[i] = rank;
    if (last) {
        cells[key * p.blocks + blk] = rank + 1u;
    }
}

@compute @workgroup_size(256)
fn permute_scan_reduce(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_index) lid: u32) {
    let tile = wid.x + wid.y * nwg.x;
    if (tile >= p.tiles) {
        return;
    }
    let first = tile * TILE + lid * PER;
    var s = 0u;
    for (var q = 0u; q < PER; q++) {
        if (first + q < p.cells) {
            s += scan_cells[first + q];
        }
    }
    let r = wg_scan(lid, s);
    if (lid == 0u) {
        scan_tiles[tile] = r.y;
    }
}

@compute @workgroup_size(256)
fn permute_scan_tiles(@builtin(local_invocation_index) lid: u32) {
    var carry = 0u;
    for (var base = 0u; base < p.tiles; base += TILE) {
        let first = base + lid * PER;
        var v: array<u32, PER>;
        var s = 0u;
        for (var q = 0u; q < PER; q++) {
            v[q] = 0u;
            if (first + q < p.tiles) {
                v[q] = tile_sums[first + q];
            }
            s += v[q];
        }
        let r = wg_scan(lid, s);
        var run = carry + r.x - s;
        for (var q = 0u; q < PER; q++) {
            if (first + q < p.tiles) {
                tile_sums[first + q] = run;
            }
            run += v[q];
        }
        carry += r.y;
    }
}

@compute @workgroup_size(256)
fn permute_scan_down(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let tile = wid.x + wid.y * nwg.x;
    if (tile >= p.tiles) {
        return;
    }
    let first = tile * TILE + lid * PER;
    var v: array<u32, PER>;
    var s = 0u;
    for (var q = 0u; q < PER; q++) {
        v[q] = 0u;
        if (first + q < p.cells) {
            v[q] = scan_cells[first + q];
        }
        s += v[q];
    }
    let r = wg_scan(lid, s);
    var run = scan_tiles[tile] + r.x - s;
    for (var q = 0u; q < PER; q++) {
        let m = first + q;
        if (m < p.cells) {
            scan_cells[m] = run;
            if (m % p.blocks == 0u) {
                offsets[m / p.blocks] = run;
            }
        }
        run += v[q];
    }
}

@compute @workgroup_size(64)
fn permute_place(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = flat_id(wid, nwg, lid, 64u);
    if (i >= p.assignments) {
        return;
    }
    let row = cells[bucket_of(i) * p.blocks + i / CHUNK] + local_rank[i];
    sorted[row] = i;
    row_of[i] = row;
}

@compute @workgroup_size(64)
fn permute_gather(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let idx = flat_id(wid, nwg, lid, 64u);
    if (idx >= p.assignments * p.row_words) {
        return;
    }
    let r = idx / p.row_words;
    let w = idx % p.row_words;
    gx_perm[r * p.dst_words + w] = gx[(g_sorted[r] / p.slots) * p.src_words + w];
}

@compute @workgroup_size(64)
fn permute_gather4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let w4 = p.row_words / 4u;
    let idx = flat_id(wid, nwg, lid, 64u);
    if (idx >= p.assignments * w4) {
        return;
    }
    let r = idx / w4;
    let w = idx % w4;
    gx_perm4[r * (p.dst_words / 4u) + w] = gx4[(g_sorted[r] / p.slots) * (p.src_words / 4u) + w];
}

@compute @workgroup_size(64)
fn permute_gather16(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let idx = flat_id(wid, nwg, lid, 64u);
    if (idx >= p.assignments * p.dst_words) {
        return;
    }
    let r = idx / p.dst_words;
    let c = 2u * (idx % p.dst_words);
    let e0 = (g_sorted[r] / p.slots) * p.x_stride + c;
    let lo = a_half(gx[a_word(e0)], e0);
    var hi = 0u;
    if (c + 1u < p.hidden) {
        hi = a_half(gx[a_word(e0 + 1u)], e0 + 1u);
    }
    gx_perm[idx] = lo | (hi << 16u);
}
