// gate.wgsl — placeholder until the stage shader lands (issue #3).
@compute @workgroup_size(1)
fn placeholder_gate() {}
