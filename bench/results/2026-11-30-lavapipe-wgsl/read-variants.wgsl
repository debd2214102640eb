@group(0) @binding(0) var<storage, read> inp: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read_write> outp: array<u32>;
@group(0) @binding(2) var<uniform> prm: array<vec4<u32>, 4>;

// contiguous chunk per workgroup, coalesced inside (n4 = prm[0].x vec4s, per_wg = prm[0].y)
@compute @workgroup_size(64)
fn read_chunk(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let n4 = prm[0].x;
    let per = prm[0].y;
    let lo = wid.x * per;
    let hi = min(lo + per, n4);
    var acc = vec4<u32>(0u);
    for (var i = lo + lid; i < hi; i += 64u) {
        acc ^= inp[i];
    }
    outp[wid.x * 64u + lid] = acc.x ^ acc.y ^ acc.z ^ acc.w;
}

@compute @workgroup_size(256)
fn read_chunk256(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let n4 = prm[0].x;
    let per = prm[0].y;
    let lo = wid.x * per;
    let hi = min(lo + per, n4);
    var acc = vec4<u32>(0u);
    for (var i = lo + lid; i < hi; i += 256u) {
        acc ^= inp[i];
    }
    outp[wid.x * 256u + lid] = acc.x ^ acc.y ^ acc.z ^ acc.w;
}

// bf16 dot: sum of decoded elements (f32 math)
@compute @workgroup_size(64)
fn read_bf16(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let n4 = prm[0].x;
    let per = prm[0].y;
    let lo = wid.x * per;
    let hi = min(lo + per, n4);
    var acc = vec4<f32>(0.0);
    for (var i = lo + lid; i < hi; i += 64u) {
        let v = inp[i];
        acc = fma(bitcast<vec4<f32>>(v << vec4<u32>(16u)), vec4<f32>(1.5), acc);
        acc = fma(bitcast<vec4<f32>>(v & vec4<u32>(0xffff0000u)), vec4<f32>(0.5), acc);
    }
    outp[wid.x * 64u + lid] = bitcast<u32>(acc.x + acc.y + acc.z + acc.w);
}

@compute @workgroup_size(64)
fn read_unroll4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let n4 = prm[0].x;
    let per = prm[0].y; // multiple of 256
    let lo = wid.x * per;
    let hi = min(lo + per, n4);
    var acc = vec4<u32>(0u);
    var i = lo + lid;
    for (; i + 192u < hi; i += 256u) {
        acc ^= inp[i] ^ inp[i + 64u] ^ inp[i + 128u] ^ inp[i + 192u];
    }
    for (; i < hi; i += 64u) {
        acc ^= inp[i];
    }
    outp[wid.x * 64u + lid] = acc.x ^ acc.y ^ acc.z ^ acc.w;
}

@compute @workgroup_size(8)
fn read_wg8(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let n4 = prm[0].x;
    let per = prm[0].y;
    let lo = wid.x * per;
    let hi = min(lo + per, n4);
    var acc = vec4<u32>(0u);
    for (var i = lo + lid; i < hi; i += 8u) {
        acc ^= inp[i];
    }
    outp[wid.x * 8u + lid] = acc.x ^ acc.y ^ acc.z ^ acc.w;
}

// each workgroup of 64 handles `per` vec4s as rows of 64: row loop uniform
@compute @workgroup_size(64)
fn read_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let per = prm[0].y; // multiple of 64, all in range
    let lo = wid.x * per;
    var acc = vec4<u32>(0u);
    for (var r = 0u; r < per; r += 64u) {
        acc ^= inp[lo + r + lid];
    }
    outp[wid.x * 64u + lid] = acc.x ^ acc.y ^ acc.z ^ acc.w;
}

// 8-lane groups each stream their own contiguous segment (128 B per step): per = vec4 per workgroup
@compute @workgroup_size(64)
fn read_g8(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let n4 = prm[0].x;
    let per = prm[0].y;
    let seg = per / 8u;
    let lo = wid.x * per + (lid >> 3u) * seg;
    let hi = min(lo + seg, n4);
    var acc = vec4<u32>(0u);
    for (var i = lo + (lid & 7u); i < hi; i += 8u) {
        acc ^= inp[i];
    }
    outp[wid.x * 64u + lid] = acc.x ^ acc.y ^ acc.z ^ acc.w;
}

@compute @workgroup_size(64)
fn read_g8u4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let n4 = prm[0].x;
    let per = prm[0].y; // multiple of 256, all in range
    let seg = per / 8u;
    let lo = wid.x * per + (lid >> 3u) * seg;
    var acc = vec4<u32>(0u);
    for (var i = lo + (lid & 7u); i < lo + seg; i += 32u) {
        acc ^= inp[i] ^ inp[i + 8u] ^ inp[i + 16u] ^ inp[i + 24u];
    }
    outp[wid.x * 64u + lid] = acc.x ^ acc.y ^ acc.z ^ acc.w;
}
