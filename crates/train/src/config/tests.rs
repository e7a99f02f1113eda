//! Run configs: parsing, overrides, validation and their error messages.

use super::*;

const THEORY: &str = r#"
name = "t"
seed = 3
steps = 10
[model]
family = "theory"
depth = 4
width = 16
input_dim = 8
output_dim = 1
tau = "1/sqrt(L)"
[data]
source = "synthetic"
n = 8
p = 8
d = 1
batch_size = 8
[loss]
kind = "squared"
[optim]
kind = "gd"
lr = 0.02
"#;

fn table(s: &str) -> toml::Table {
    s.parse().unwrap()
}

#[test]
fn overrides_parse_toml_values_and_fall_back_to_strings() {
    let mut t = table("[model]\ndepth = 4\n");
    let sets = [
        "model.depth=110".to_string(),
        "model.tau=0.5/sqrt(L)".to_string(),
        "optim.schedule.step.milestones=[100, 150]".to_string(),
        "data.subset={ balanced_k = 10 }".to_string(),
        "log.quoted=\"x y\"".to_string(),
    ];
    apply_overrides(&mut t, &sets).unwrap();
    assert_eq!(t["model"]["depth"].as_integer(), Some(110));
    assert_eq!(t["model"]["tau"].as_str(), Some("0.5/sqrt(L)"));
    assert_eq!(
        t["optim"]["schedule"]["step"]["milestones"]
            .as_array()
            .map(|a| a.len()),
        Some(2)
    );
    assert_eq!(t["data"]["subset"]["balanced_k"].as_integer(), Some(10));
    assert_eq!(t["log"]["quoted"].as_str(), Some("x y"));
}

#[test]
fn override_through_a_scalar_is_an_error_naming_the_key() {
    let mut t = table("seed = 1\n");
    let err = apply_overrides(&mut t, &["seed.x=2".into()]).unwrap_err();
    assert!(err.to_string().contains("`seed` is integer"), "{err}");
    let err = apply_overrides(&mut t, &["nonsense".into()]).unwrap_err();
    assert!(err.to_string().contains("key=value"), "{err}");
}

#[test]
fn theory_config_parses_and_round_trips() {
    let cfg = config_from_table(table(THEORY)).unwrap();
    assert_eq!(cfg.optim.kind, OptimKind::Gd);
    assert_eq!(cfg.loss.kind, LossKind::Squared);
    assert_eq!(cfg.device, DeviceSpec::Auto);
    let again = config_from_table(table(&cfg.to_toml().unwrap())).unwrap();
    assert_eq!(cfg, again);
}

#[test]
fn unknown_key_is_an_error_naming_it() {
    let mut t = table(THEORY);
    apply_overrides(&mut t, &["optim.lrr=0.1".into()]).unwrap();
    let err = chain(config_from_table(t).unwrap_err());
    assert!(err.contains("optim") && err.contains("lrr"), "{err}");
}

#[test]
fn ill_typed_value_is_an_error_naming_the_key() {
    let mut t = table(THEORY);
    apply_overrides(&mut t, &["optim.lr=fast".into()]).unwrap();
    let err = chain(config_from_table(t).unwrap_err());
    assert!(err.contains("optim.lr"), "{err}");
    let mut t = table(THEORY);
    apply_overrides(&mut t, &["data.batch_size=-3".into()]).unwrap();
    let err = chain(config_from_table(t).unwrap_err());
    assert!(err.contains("data.batch_size"), "{err}");
}

#[test]
fn a_bad_model_setting_names_its_key_inside_the_model_table() {
    // serde reports errors inside the tagged `[model]` enum at `model` itself.
    let cases = [
        (
            "model.depth=4=5",
            "key `model.depth`: invalid type: string \"4=5\", expected usize",
        ),
        ("model.width=-1", "key `model.width`"),
        ("model.widht=3", "key `model.widht`: unknown field `widht`"),
        (
            "model.family=\"mlp\"",
            "key `model.family`: unknown variant `mlp`",
        ),
        (
            "model.tau=fast",
            "key `model.tau`: invalid tau rule \"fast\"",
        ),
    ];
    for (set, expected) in cases {
        let mut t = table(THEORY);
        apply_overrides(&mut t, &[set.into()]).unwrap();
        let err = chain(config_from_table(t).unwrap_err());
        assert!(err.starts_with(expected), "{set}: {err}");
        // One line: the message without the path repeated below it.
        assert!(!err.contains('\n'), "{set}: {err:?}");
    }
}

#[test]
fn epochs_and_steps_are_exclusive() {
    let mut t = table(THEORY);
    apply_overrides(&mut t, &["epochs=3".into()]).unwrap();
    let err = config_from_table(t).unwrap_err().to_string();
    assert!(err.contains("only one of"), "{err}");
}

#[test]
fn a_subset_of_synthetic_data_is_refused_not_ignored() {
    for (set, want) in [
        (
            "data.subset={ first_n = 4 }",
            "`data.subset` does not apply to synthetic data",
        ),
        (
            "data.test_subset={ random_n = 4 }",
            "set `data.n_test` instead",
        ),
    ] {
        let mut t = table(THEORY);
        apply_overrides(&mut t, &[set.into()]).unwrap();
        let err = config_from_table(t).unwrap_err().to_string();
        assert!(err.contains(want), "{set}: {err}");
    }
}

#[test]
fn an_integer_out_of_range_is_named_not_taken_as_a_string() {
    let mut t = table(THEORY);
    let err = apply_overrides(&mut t, &["seed=18446744073709551615".into()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("outside TOML's integer range"), "{err}");
    apply_overrides(&mut t, &["seed=9223372036854775807".into()]).unwrap();
}

#[test]
fn schedules_parse() {
    for (s, want) in [
        ("\"constant\"", ScheduleConfig::Constant),
        ("\"cosine\"", ScheduleConfig::Cosine),
        (
            "{ step = { milestones = [2, 5], gamma = 0.1 } }",
            ScheduleConfig::Step {
                milestones: vec![2, 5],
                gamma: 0.1,
            },
        ),
    ] {
        let mut t = table(THEORY);
        apply_overrides(&mut t, &[format!("optim.schedule={s}")]).unwrap();
        assert_eq!(config_from_table(t).unwrap().optim.schedule, want);
    }
}

#[test]
fn clip_grad_norm_is_optional_and_not_negative() {
    assert_eq!(
        config_from_table(table(THEORY))
            .unwrap()
            .optim
            .clip_grad_norm,
        None
    );
    let mut t = table(THEORY);
    apply_overrides(&mut t, &["optim.clip_grad_norm=1.5".into()]).unwrap();
    assert_eq!(
        config_from_table(t).unwrap().optim.clip_grad_norm,
        Some(1.5)
    );
    let mut t = table(THEORY);
    apply_overrides(&mut t, &["optim.clip_grad_norm=0".into()]).unwrap();
    assert_eq!(
        config_from_table(t).unwrap().optim.clip_grad_norm,
        Some(0.0)
    );
    for bad in ["-1.0", "nan", "inf"] {
        let mut t = table(THEORY);
        apply_overrides(&mut t, &[format!("optim.clip_grad_norm={bad}")]).unwrap();
        let err = chain(config_from_table(t).unwrap_err());
        assert!(err.contains("optim.clip_grad_norm"), "{bad}: {err}");
    }
}

#[test]
fn device_strings() {
    assert_eq!("cuda:2".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(2)));
    assert_eq!("cuda".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(0)));
    assert!("gpu".parse::<DeviceSpec>().is_err());
    assert!("cuda:x".parse::<DeviceSpec>().is_err());
}

#[test]
fn missing_file_names_it() {
    let err = load_config(Path::new("no/such/config.toml"), &[]).unwrap_err();
    assert!(chain(err).contains("no/such/config.toml"));
}

/// The error and its causes, as the binary prints them (`error: a: b: c`).
fn chain(err: crate::Error) -> String {
    format!("{:#}", anyhow::Error::from(err))
}
