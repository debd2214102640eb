// read_ceiling.wgsl — not a stage: the read ceiling `moe bench` measures on wgpu, a trivial
// kernel that only streams bytes, so that a weight-streaming kernel's rate can be compared
// with what a WGSL kernel reading the same amount can reach on the same adapter (on lavapipe
// a buffer copy is a memcpy in the driver, far above any shader's reads).
//
// Computes: out[w·64 + i] = XOR of the vec4<u32> words src[w·per + (i / 8)·(per / 8) +
//   i % 8 + 8·j] (j ≥ 0, within the group's segment and below n4), folded to one u32: every
//   word of src is read once, and the result depends on each.
// Mirrors: nothing (a measurement); src/wgpu/context.rs `WgpuDevice::read_seconds` runs it.
// Parameters (bindings of group 0):
//   0 p    uniform             ReadParams: n4 = vec4 words of src, per = vec4 words per workgroup
//   1 src  storage read        array<vec4<u32>> [n4]
//   2 out  storage read_write  u32 [workgroups · 64]
// Launch: workgroup_size 64; grid (ceil(n4 / per), 1, 1) (per = 4096: 64 KiB per workgroup);
//   workgroup w reads its contiguous 64 KiB as 8 segments of 8 KiB, one per group of 8
//   invocations, which reads 8 consecutive vec4 words (one 128-byte line) per load, four
//   loads (lines) in flight per step: the
//   access pattern of the expert GEMV and the router (8 invocations per 128-byte row of a
//   slab, k in order), coalesced into whole lines on a GPU. (On lavapipe this reads about 4x
//   faster than 64 invocations walking the 64 KiB together, 1 KiB per step.)
// Workgroup memory: none. No barrier, no subgroup operation.
// Target: WGSL core.

struct ReadParams {
    n4: u32,
    per: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: ReadParams;
@group(0) @binding(1) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;

@compute @workgroup_size(64)
fn read_ceiling(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let seg = p.per / 8u;
    let lo = wid.x * p.per + (lid >> 3u) * seg;
    let hi = min(lo + seg, p.n4);
    var acc = vec4<u32>(0u);
    var i = lo + (lid & 7u);
    // Four independent loads in flight per step, then the rest of a partial segment.
    for (; i + 24u < hi; i += 32u) {
        acc ^= src[i] ^ src[i + 8u] ^ src[i + 16u] ^ src[i + 24u];
    }
    for (; i < hi; i += 8u) {
        acc ^= src[i];
    }
    out[wid.x * 64u + lid] = acc.x ^ acc.y ^ acc.z ^ acc.w;
}
