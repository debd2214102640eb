//! What CI must provide: a Vulkan adapter for wgpu (Mesa's lavapipe, installed by .ci/run).
//! Outside CI this only reports what it finds; with `CI=true` a missing adapter fails.

#[cfg(feature = "wgpu")]
#[test]
fn ci_has_a_vulkan_adapter() {
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true");
    match moe_kernels::wgpu::probe() {
        Ok(adapters) => {
            for a in &adapters {
                println!(
                    "wgpu adapter: {} [{}; {}]",
                    a.name, a.backend, a.device_type
                );
            }
            let vulkan = adapters.iter().any(|a| a.backend == "Vulkan");
            // wgpu silently falls back to GL; in CI only a Vulkan adapter counts.
            assert!(
                vulkan || !in_ci,
                "CI=true but wgpu found no Vulkan adapter (only {adapters:?})"
            );
        }
        Err(why) => {
            println!("wgpu: {why}");
            assert!(!in_ci, "CI=true but wgpu found no adapter: {why}");
        }
    }
}
