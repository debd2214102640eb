//! Reading the transformers fixtures of tests/fixtures/ (see its README): expected outputs
//! and dense `[T, E]` views of a forward's routing to compare with them.

use std::path::{Path, PathBuf};

use safetensors::SafeTensors;

/// A fixture's expected outputs (float64 transformers).
pub struct Expected {
    pub t: usize,
    pub e: usize,
    pub y: Vec<f64>,
    pub selected: Vec<i32>,
    pub dispatch: Vec<i32>,
    pub weights: Vec<f64>,
}

/// The fixtures folder: `CARGO_MANIFEST_DIR` at run time when set (test binaries carried to
/// another machine, e.g. by scripts/device-check.sh), else where the crate was built.
pub fn fixtures_dir() -> PathBuf {
    let root = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    Path::new(&root).join("tests/fixtures")
}

/// Reads an `*.expected.safetensors` file.
pub fn read_expected(path: &Path) -> Expected {
    let bytes = std::fs::read(path).expect("expected file");
    let st = SafeTensors::deserialize(&bytes).expect("expected file parses");
    let f64s = |name: &str| -> (Vec<usize>, Vec<f64>) {
        let v = st.tensor(name).expect(name);
        (
            v.shape().to_vec(),
            bytemuck::pod_collect_to_vec::<u8, f64>(v.data()),
        )
    };
    let i32s = |name: &str| -> Vec<i32> {
        bytemuck::pod_collect_to_vec::<u8, i32>(st.tensor(name).expect(name).data())
    };
    let (ys, y) = f64s("y");
    let (ws, weights) = f64s("weights");
    Expected {
        t: ys[0],
        e: ws[1],
        y,
        selected: i32s("selected"),
        dispatch: i32s("dispatch"),
        weights,
    }
}

/// Dense `[T, E]` views of our routing: (selected, dispatched, weight applied).
pub fn dense(
    t: usize,
    e: usize,
    slots: usize,
    ids: &[u32],
    kept: &[bool],
    w: &[f64],
) -> (Vec<i32>, Vec<i32>, Vec<f64>) {
    let (mut sel, mut dis, mut wd) = (vec![0; t * e], vec![0; t * e], vec![0.0; t * e]);
    for ti in 0..t {
        for j in 0..slots {
            let i = ti * slots + j;
            let c = ti * e + ids[i] as usize;
            sel[c] = 1;
            if kept[i] {
                dis[c] = 1;
                wd[c] = w[i];
            }
        }
    }
    (sel, dis, wd)
}
