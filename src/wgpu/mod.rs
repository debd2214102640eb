//! WebGPU path: WGSL shaders in `shaders/` run through wgpu (Vulkan, Metal, DX12, lavapipe).
//! The stage shaders are not written yet (issue #3); today this module only enumerates
//! adapters so that `moe info` and backend selection can say what is there.

/// One wgpu adapter.
#[derive(Debug, Clone)]
pub struct AdapterSummary {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
}

/// Lists the adapters wgpu finds. Instance creation honours `WGPU_BACKEND` and the other
/// `WGPU_*` variables.
pub fn probe() -> Result<Vec<AdapterSummary>, String> {
    let desc = ::wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    let backends = desc.backends;
    let instance = ::wgpu::Instance::new(desc);
    let adapters = pollster::block_on(instance.enumerate_adapters(backends));
    if adapters.is_empty() {
        return Err("wgpu found no adapter (install a Vulkan driver, e.g. Mesa's lavapipe)".into());
    }
    Ok(adapters
        .iter()
        .map(|a| {
            let i = a.get_info();
            AdapterSummary {
                name: i.name,
                backend: format!("{:?}", i.backend),
                device_type: format!("{:?}", i.device_type),
                driver: format!("{} {}", i.driver, i.driver_info).trim().to_string(),
            }
        })
        .collect())
}
