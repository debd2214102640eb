//! A pool of device buffers that a prepared layer keeps between forwards, so that a forward
//! allocates nothing: every stage encoder asks the pool for its scratch and uniform buffers
//! by label, and the pool hands back the buffer it created the first time that label was asked
//! for that often (reallocating only when a request is larger than what it holds, which
//! [`MoeLayer::prepare`](crate::MoeLayer::prepare) avoids by recording a forward at
//! `max_tokens` once).
//!
//! Keys are `(label, occurrence)`: the n-th request of one label since [`Scratch::begin`] gets
//! the n-th buffer of that label, so two dispatches of one forward never share a uniform.
//! Uniform contents are written with `Queue::write_buffer`, which takes effect at the next
//! queue submission: a forward recorded into an encoder must be submitted before the next
//! forward of the same prepared layer is recorded.

use std::collections::HashMap;
use std::sync::Mutex;

use bytemuck::Pod;

use crate::error::Result;
use crate::wgpu::context::{gpu_err, GpuBuffer, WgpuDevice};

type Key = (&'static str, usize);

/// Pooled storage and uniform buffers, keyed by `(label, occurrence)`.
#[derive(Debug, Default)]
pub struct Scratch {
    inner: Mutex<Pool>,
}

#[derive(Debug, Default)]
struct Pool {
    storage: HashMap<Key, ::wgpu::Buffer>,
    uniforms: HashMap<Key, ::wgpu::Buffer>,
    seen: HashMap<(&'static str, bool), usize>,
    /// The n-th bind group of the last forwards: reused when the n-th bind of this forward
    /// has the same pipeline and the same buffer ranges (a decode loop at one T reuses all).
    binds: Vec<CachedBind>,
    /// Binds made since [`Scratch::begin`].
    bind_cursor: usize,
}

/// One buffer binding: binding number, buffer, offset, size.
type BindKey = (u32, ::wgpu::Buffer, u64, Option<std::num::NonZeroU64>);

#[derive(Debug)]
struct CachedBind {
    pipeline: ::wgpu::ComputePipeline,
    key: Vec<BindKey>,
    group: ::wgpu::BindGroup,
}

impl Pool {
    fn next(&mut self, label: &'static str, uniform: bool) -> Key {
        let n = self.seen.entry((label, uniform)).or_insert(0);
        *n += 1;
        (label, *n - 1)
    }
}

impl Scratch {
    /// An empty pool.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a new forward: occurrence counters restart, buffers stay.
    pub fn begin(&self) -> Result<()> {
        let mut pool = self.lock()?;
        pool.seen.clear();
        pool.bind_cursor = 0;
        Ok(())
    }

    /// A bind group for group 0 of `pipeline` with `resources` at bindings 0, 1, 2, …, reused
    /// from an earlier forward when it is the same (see [`Scratch::bind_entries`]).
    pub fn bind(
        &self,
        dev: &WgpuDevice,
        pipeline: &::wgpu::ComputePipeline,
        resources: &[::wgpu::BindingResource<'_>],
    ) -> Result<::wgpu::BindGroup> {
        let entries: Vec<::wgpu::BindGroupEntry<'_>> = resources
            .iter()
            .enumerate()
            .map(|(i, r)| ::wgpu::BindGroupEntry {
                binding: i as u32,
                resource: r.clone(),
            })
            .collect();
        self.bind_entries(dev, pipeline, &entries)
    }

    /// A bind group for group 0 of `pipeline` with `entries` (buffer bindings only). The n-th
    /// call since [`Scratch::begin`] reuses the n-th group of the previous forwards when the
    /// pipeline and every buffer range are the same, else creates it (bind groups are not
    /// buffers: [`WgpuDevice::allocations`] does not count them).
    pub fn bind_entries(
        &self,
        dev: &WgpuDevice,
        pipeline: &::wgpu::ComputePipeline,
        entries: &[::wgpu::BindGroupEntry<'_>],
    ) -> Result<::wgpu::BindGroup> {
        let key = entries
            .iter()
            .map(|e| match &e.resource {
                ::wgpu::BindingResource::Buffer(b) => {
                    Ok((e.binding, b.buffer.clone(), b.offset, b.size))
                }
                _ => Err(gpu_err("the scratch pool binds buffers only")),
            })
            .collect::<Result<Vec<BindKey>>>()?;
        let mut pool = self.lock()?;
        let i = pool.bind_cursor;
        pool.bind_cursor += 1;
        if let Some(c) = pool.binds.get(i) {
            if &c.pipeline == pipeline && c.key == key {
                return Ok(c.group.clone());
            }
        }
        let group = dev.device.create_bind_group(&::wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries,
        });
        let cached = CachedBind {
            pipeline: pipeline.clone(),
            key,
            group: group.clone(),
        };
        if i < pool.binds.len() {
            pool.binds[i] = cached;
        } else {
            pool.binds.push(cached);
        }
        Ok(group)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Pool>> {
        self.inner
            .lock()
            .map_err(|_| gpu_err("scratch pool poisoned"))
    }

    /// A storage buffer of at least `len` elements of `T` (contents undefined: whatever the
    /// previous forward left). Its `len` is `len`.
    pub fn buffer<T: Pod>(
        &self,
        dev: &WgpuDevice,
        label: &'static str,
        len: usize,
    ) -> Result<GpuBuffer<T>> {
        let bytes = (len.saturating_mul(std::mem::size_of::<T>()) as u64)
            .max(4)
            .next_multiple_of(4);
        let mut pool = self.lock()?;
        let key = pool.next(label, false);
        if let Some(b) = pool.storage.get(&key) {
            if b.size() >= bytes {
                return Ok(GpuBuffer::from_raw(b.clone(), len));
            }
        }
        let fresh = dev.alloc::<T>(len, label)?;
        pool.storage.insert(key, fresh.buffer.clone());
        Ok(fresh)
    }

    /// A uniform buffer holding `params` (written with `Queue::write_buffer`).
    pub fn uniform<T: Pod>(
        &self,
        dev: &WgpuDevice,
        label: &'static str,
        params: &T,
    ) -> Result<::wgpu::Buffer> {
        let bytes = bytemuck::bytes_of(params);
        let mut pool = self.lock()?;
        let key = pool.next(label, true);
        if let Some(b) = pool.uniforms.get(&key) {
            if b.size() >= bytes.len() as u64 {
                dev.queue.write_buffer(b, 0, bytes);
                return Ok(b.clone());
            }
        }
        let fresh = dev.uniform(params);
        pool.uniforms.insert(key, fresh.clone());
        Ok(fresh)
    }

    /// Bytes the pool holds.
    pub fn bytes(&self) -> u64 {
        self.inner.lock().map_or(0, |p| {
            p.storage
                .values()
                .chain(p.uniforms.values())
                .map(::wgpu::Buffer::size)
                .sum()
        })
    }
}
