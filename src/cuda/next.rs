//! The opt-in for CUDA kernels that are assembled and checked offline (ptxas, SASS, address
//! models) but have not run on a GPU yet: `MOE_CUDA_KERNELS=next`. The verified kernels stay
//! the default until a device check (`scripts/device-check.sh`) has run the new ones against
//! the CPU reference and timed them.

/// The environment variable that selects the next kernels.
pub const ENV: &str = "MOE_CUDA_KERNELS";

/// Whether `MOE_CUDA_KERNELS=next` is set (surrounding whitespace ignored). Any other value,
/// or none, keeps the verified kernels.
pub fn next_kernels() -> bool {
    #[cfg(test)]
    if let Some(on) = FORCED.with(std::cell::Cell::get) {
        return on;
    }
    is_next(std::env::var(ENV).ok().as_deref())
}

#[cfg(test)]
thread_local! {
    static FORCED: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Tests: [`next_kernels`] answers `on` on this thread until the guard drops (tests run in
/// parallel threads, so the environment cannot be changed safely).
#[cfg(test)]
pub(crate) fn force_for_thread(on: bool) -> ForceGuard {
    FORCED.with(|f| f.set(Some(on)));
    ForceGuard
}

/// Restores the environment's answer when dropped (see [`force_for_thread`]).
#[cfg(test)]
pub(crate) struct ForceGuard;

#[cfg(test)]
impl Drop for ForceGuard {
    fn drop(&mut self) {
        FORCED.with(|f| f.set(None));
    }
}

/// Whether `value` (of [`ENV`], `None` when unset) selects the next kernels.
pub fn is_next(value: Option<&str>) -> bool {
    value.is_some_and(|v| v.trim() == "next")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_thread_override_wins_and_is_restored() {
        let env = next_kernels();
        {
            let _g = force_for_thread(!env);
            assert_eq!(next_kernels(), !env);
        }
        assert_eq!(next_kernels(), env);
    }

    #[test]
    fn only_next_opts_in() {
        assert!(is_next(Some("next")));
        assert!(is_next(Some(" next\n")));
        for v in [None, Some(""), Some("verified"), Some("NEXT"), Some("nxt")] {
            assert!(!is_next(v), "{v:?}");
        }
    }
}
