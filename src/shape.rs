//! Shape validation shared by every backend: each public stage call checks its inputs and
//! outputs here before anything is computed or launched.

use crate::error::{Error, Result};
use crate::stage::Stage;
use crate::tensor::Tensor;

/// `(rows, cols)` of a rank-2 tensor, or an error naming it.
pub fn matrix(stage: Stage, name: &str, t: &Tensor) -> Result<(usize, usize)> {
    match t.shape() {
        [r, c] => Ok((*r, *c)),
        s => Err(Error::shape(
            stage,
            format!("{name} must be rank 2, got shape {s:?}"),
        )),
    }
}

/// `(d0, d1, d2)` of a rank-3 tensor, or an error naming it.
pub fn rank3(stage: Stage, name: &str, t: &Tensor) -> Result<(usize, usize, usize)> {
    match t.shape() {
        [a, b, c] => Ok((*a, *b, *c)),
        s => Err(Error::shape(
            stage,
            format!("{name} must be rank 3, got shape {s:?}"),
        )),
    }
}

/// An error unless `have == want`.
pub fn expect_eq(stage: Stage, what: &str, have: usize, want: usize) -> Result<()> {
    if have == want {
        Ok(())
    } else {
        Err(Error::shape(
            stage,
            format!("{what}: expected {want}, got {have}"),
        ))
    }
}

/// An error unless `t` has exactly shape `want`.
pub fn expect_shape(stage: Stage, name: &str, t: &Tensor, want: &[usize]) -> Result<()> {
    if t.shape() == want {
        Ok(())
    } else {
        Err(Error::shape(
            stage,
            format!("{name}: expected shape {want:?}, got {:?}", t.shape()),
        ))
    }
}

/// An error unless a buffer named `name` holds `want` elements.
pub fn expect_len(stage: Stage, name: &str, have: usize, want: usize) -> Result<()> {
    if have == want {
        Ok(())
    } else {
        Err(Error::shape(
            stage,
            format!("{name}: expected {want} elements, got {have}"),
        ))
    }
}

/// `a * b`, or an error when it overflows `usize`.
pub fn mul(stage: Stage, what: &str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| Error::shape(stage, format!("{what}: {a} x {b} overflows")))
}
