//! The JSON config: presets, overriding keys, explicit nulls, and every rejected input.

use moe_kernels::config::{
    Activation, Capacity, ClampedSwiglu, Combine, Groups, Priority, Scoring,
};
use moe_kernels::{Error, LayerConfig, Preset};

fn parse(s: &str) -> Result<LayerConfig, Error> {
    LayerConfig::from_json(s, "test.json")
}

#[test]
fn presets_are_what_the_reference_implementations_do() {
    let c = parse(r#"{"preset":"mixtral"}"#).unwrap();
    assert_eq!(
        (c.routing.top_k, c.routing.scoring, c.routing.renormalize),
        (2, Scoring::Softmax, true)
    );
    let c = parse(r#"{"preset":"qwen2_moe"}"#).unwrap();
    assert_eq!((c.routing.top_k, c.routing.renormalize), (4, false));
    let c = parse(r#"{"preset":"qwen3_moe"}"#).unwrap();
    assert_eq!((c.routing.top_k, c.routing.renormalize), (8, true));
    let c = parse(r#"{"preset":"deepseek_v3"}"#).unwrap();
    assert_eq!(c.routing.scoring, Scoring::Sigmoid);
    assert_eq!(c.routing.groups, Some(Groups { count: 8, keep: 4 }));
    assert_eq!((c.routing.top_k, c.routing.scale), (8, 2.5));
    let c = parse(r#"{"preset":"gpt_oss"}"#).unwrap();
    assert_eq!(
        (c.routing.scoring, c.routing.combine),
        (Scoring::Logits, Combine::SoftmaxSelected)
    );
    assert_eq!(
        c.activation,
        Activation::ClampedSwiglu(ClampedSwiglu {
            alpha: 1.702,
            limit: 7.0
        })
    );
    let c = parse(r#"{"preset":"switch"}"#).unwrap();
    assert_eq!(
        (c.routing.top_k, c.routing.capacity, c.activation),
        (1, Some(Capacity::Tokens(64)), Activation::Relu)
    );
    let c = parse(r#"{"preset":"nllb_moe"}"#).unwrap();
    assert_eq!(
        (c.routing.capacity, c.output_scale),
        (Some(Capacity::Fraction(1.0)), 0.8)
    );
    let c = parse(r#"{"preset":"gpt4"}"#).unwrap();
    assert_eq!(c.routing.top_k, 2);
    for p in Preset::ALL {
        assert_eq!(p.name().parse::<Preset>().unwrap(), p);
        assert_eq!(
            parse(&format!(r#"{{"preset":"{}"}}"#, p.name())).unwrap(),
            p.config()
        );
    }
}

#[test]
fn keys_override_presets_and_null_clears() {
    let c = parse(
        r#"{"preset":"deepseek_v3","top_k":2,"groups":null,"capacity":{"factor":1.25},"priority":"top1_score",
            "activation":{"clamped_swiglu":{"alpha":1.0,"limit":3.0}},"output_scale":0.5,"scale":1.0,
            "renormalize":false,"combine":"score","scoring":"softmax"}"#,
    )
    .unwrap();
    assert_eq!(c.routing.groups, None);
    assert_eq!(c.routing.capacity, Some(Capacity::Factor(1.25)));
    assert_eq!(c.routing.priority, Priority::Top1Score);
    assert_eq!((c.routing.top_k, c.output_scale), (2, 0.5));
    let c = parse(r#"{"preset":"switch","capacity":null}"#).unwrap();
    assert_eq!(c.routing.capacity, None);
    let c = parse(r#"{"expert_choice":{"capacity_factor":2.0}}"#).unwrap();
    assert!(c.routing.expert_choice.is_some());
    // No preset: Mixtral-like defaults.
    assert_eq!(parse("{}").unwrap(), LayerConfig::default());
}

#[test]
fn bad_configs_are_errors_that_say_why() {
    let cases = [
        ("{", "EOF"),
        ("[1]", "object"),
        (r#"{"topk":2}"#, "unknown key"),
        (
            r#"{"groups":{"count":2,"keep":1,"extra":1}}"#,
            "unknown field",
        ),
        (r#"{"top_k":"two"}"#, "top_k"),
        (r#"{"top_k":0}"#, "top_k"),
        (r#"{"top_k":-3}"#, "top_k"),
        (r#"{"preset":"llama"}"#, "preset"),
        (r#"{"scoring":"tanh"}"#, "scoring"),
        (r#"{"groups":{"count":2,"keep":3}}"#, "keep"),
        (r#"{"groups":{"count":0,"keep":0}}"#, "count"),
        (r#"{"capacity":{"tokens":0}}"#, "capacity"),
        (r#"{"capacity":{"tokens":-1}}"#, "capacity"),
        (r#"{"capacity":{"fraction":0.0}}"#, "capacity"),
        (r#"{"capacity":{"factor":-1.0}}"#, "capacity"),
        (r#"{"capacity":{"percent":5}}"#, "capacity"),
        (
            r#"{"expert_choice":{"capacity_factor":0}}"#,
            "capacity_factor",
        ),
        (
            r#"{"expert_choice":{"capacity_factor":1},"capacity":{"tokens":2}}"#,
            "expert_choice",
        ),
        (r#"{"activation":"tanh"}"#, "activation"),
        (
            r#"{"activation":{"clamped_swiglu":{"alpha":1.0,"limit":0.0}}}"#,
            "limit",
        ),
        (r#"{"renormalize":1}"#, "renormalize"),
    ];
    for (json, needle) in cases {
        let err = parse(json).expect_err(json).to_string();
        assert!(
            err.contains(needle),
            "{json}: error {err:?} does not mention {needle:?}"
        );
    }
}

#[test]
fn shape_dependent_checks() {
    let c = parse(r#"{"preset":"qwen3_moe"}"#).unwrap();
    assert!(c.routing.validate(8).is_ok());
    assert!(c.routing.validate(7).is_err(), "top_k 8 > E 7");
    let c = parse(r#"{"groups":{"count":3,"keep":1}}"#).unwrap();
    assert!(c.routing.validate(9).is_ok());
    assert!(c.routing.validate(8).is_err(), "3 groups do not divide 8");
    let c = parse(r#"{"top_k":5,"groups":{"count":4,"keep":2}}"#).unwrap();
    assert!(
        c.routing.validate(8).is_err(),
        "5 picks from 4 eligible experts"
    );
}
