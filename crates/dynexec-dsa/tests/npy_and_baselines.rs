//! The .npy reader/writer (including every malformed-input error), the entropies, and input
//! validation: user input never panics.

use dynexec_dsa::faer::Mat;
use dynexec_dsa::{
    align, delay_embed, npy_bytes, parse_npy, read_npy, spectral_entropy, weight_entropy,
    write_npy_f32, write_npy_f64, Dmd, DmdConfig, Dtype, Error, OptimizerConfig, Rank,
    Trajectories,
};

fn header(descr: &str, fortran: bool, shape: &str) -> Vec<u8> {
    let text = format!(
        "{{'descr': '{descr}', 'fortran_order': {}, 'shape': {shape}, }}\n",
        if fortran { "True" } else { "False" }
    );
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(text.len() as u16).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
    out
}

fn npy_error(bytes: &[u8]) -> String {
    match parse_npy(bytes) {
        Err(Error::Npy(msg)) => msg,
        other => panic!("expected an npy error, got {other:?}"),
    }
}

#[test]
fn round_trips_f32_and_f64() {
    let dir = std::env::temp_dir().join(format!("dynexec-dsa-npy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let values: Vec<f64> = (0..24).map(|i| i as f64 * 0.25 - 3.0).collect();
    let f32_path = dir.join("a.npy");
    let f32_values: Vec<f32> = values.iter().map(|&v| v as f32).collect();
    write_npy_f32(&f32_path, &[2, 3, 4], &f32_values).unwrap();
    let a = read_npy(&f32_path).unwrap();
    assert_eq!((a.shape.as_slice(), a.dtype), (&[2, 3, 4][..], Dtype::F32));
    assert_eq!(a.data, values);
    let f64_path = dir.join("b.npy");
    let precise: Vec<f64> = values.iter().map(|v| v + 1e-12).collect();
    write_npy_f64(&f64_path, &[24], &precise).unwrap();
    let b = read_npy(&f64_path).unwrap();
    assert_eq!((b.shape.as_slice(), b.dtype), (&[24][..], Dtype::F64));
    assert_eq!(b.data, precise);
    // NumPy aligns the data to 64 bytes.
    assert_eq!(
        npy_bytes(&[24], &precise, Dtype::F64).unwrap().len() % 64,
        0
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn reads_the_reference_files() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/data/dsa-cases/02_lds_invariance/X.npy"
    );
    let x = Trajectories::from_npy(read_npy(path).unwrap()).unwrap();
    assert_eq!((x.trials(), x.time(), x.features()), (10, 100, 4));
}

#[test]
fn malformed_files_are_errors() {
    assert!(npy_error(b"not numpy at all").contains("magic"));
    assert!(npy_error(b"\x93NUMPY").contains("magic"));

    let mut big_endian = header(">f4", false, "(2,)");
    big_endian.extend_from_slice(&[0; 8]);
    assert!(npy_error(&big_endian).contains("unsupported dtype"));

    let mut ints = header("<i4", false, "(2,)");
    ints.extend_from_slice(&[0; 8]);
    assert!(npy_error(&ints).contains("unsupported dtype"));

    let mut fortran = header("<f4", true, "(2, 2)");
    fortran.extend_from_slice(&[0; 16]);
    assert!(npy_error(&fortran).contains("Fortran"));

    let mut truncated = header("<f8", false, "(3, 4)");
    truncated.extend_from_slice(&[0; 8 * 11]);
    assert!(npy_error(&truncated).contains("truncated data"));

    let mut short_header = header("<f4", false, "(2,)");
    short_header.truncate(20);
    assert!(npy_error(&short_header).contains("truncated header"));

    let mut bad_shape = header("<f4", false, "(2, x)");
    bad_shape.extend_from_slice(&[0; 8]);
    assert!(npy_error(&bad_shape).contains("shape"));

    let missing = std::env::temp_dir().join("dynexec-dsa-no-such-file.npy");
    assert!(matches!(read_npy(missing), Err(Error::Io { .. })));
}

#[test]
fn bad_user_input_is_an_error_not_a_panic() {
    let one_d = parse_npy(&npy_bytes(&[5], &[1.0; 5], Dtype::F32).unwrap()).unwrap();
    assert!(matches!(
        Trajectories::from_npy(one_d),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        Trajectories::from_2d(3, 2, vec![0.0; 5]),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        Trajectories::from_2d(2, 1, vec![0.0, f64::NAN]),
        Err(Error::NonFinite(_))
    ));
    let x = Trajectories::from_2d(10, 2, (0..20).map(|i| (i as f64).sin()).collect()).unwrap();
    assert!(matches!(delay_embed(&x, 0, 1), Err(Error::Config(_))));
    assert!(matches!(delay_embed(&x, 6, 2), Err(Error::TooShort(_))));
    let config = |rank, lamb| DmdConfig {
        n_delays: 2,
        rank,
        lamb,
        ..DmdConfig::default()
    };
    assert!(matches!(
        Dmd::fit(&x, &config(Rank::Count(0), 0.0)),
        Err(Error::Config(_))
    ));
    assert!(matches!(
        Dmd::fit(&x, &config(Rank::Full, -1.0)),
        Err(Error::Config(_))
    ));
    assert!(matches!(
        Dmd::fit(&x, &config(Rank::ExplainedVariance(1.5), 0.0)),
        Err(Error::Config(_))
    ));
    // Fewer Hankel rows than columns.
    let wide = DmdConfig {
        n_delays: 4,
        ..DmdConfig::default()
    };
    let short = Trajectories::from_2d(6, 2, vec![0.5; 12]).unwrap();
    assert!(matches!(Dmd::fit(&short, &wide), Err(Error::TooShort(_))));
    let rect = Mat::<f64>::zeros(2, 3);
    let square = Mat::<f64>::identity(2, 2);
    let options = OptimizerConfig::default();
    assert!(matches!(
        align(rect.as_ref(), square.as_ref(), &options),
        Err(Error::Shape(_))
    ));
}

#[test]
fn delay_embedding_layout() {
    // Two trials of 6 steps, 1 feature: values 10·trial + t.
    let data: Vec<f64> = (0..2)
        .flat_map(|k| (0..6).map(move |t| (10 * k + t) as f64))
        .collect();
    let x = Trajectories::from_3d(2, 6, 1, data).unwrap();
    let h = delay_embed(&x, 3, 2).unwrap();
    // T' = 6 − 2·2 = 2 rows per trial, trials stacked; block 0 is the most recent sample.
    assert_eq!(
        (h.rows_per_trial, h.matrix.nrows(), h.matrix.ncols()),
        (2, 4, 3)
    );
    let rows: Vec<Vec<f64>> = (0..4)
        .map(|r| (0..3).map(|c| h.matrix[(r, c)]).collect())
        .collect();
    let expected = [
        [4.0, 2.0, 0.0],
        [5.0, 3.0, 1.0],
        [14.0, 12.0, 10.0],
        [15.0, 13.0, 11.0],
    ];
    assert_eq!(rows, expected.map(|r| r.to_vec()).to_vec());
}

#[test]
fn entropies() {
    assert!((spectral_entropy(&[1.0, 1.0, 1.0, 1.0]) - 1.0).abs() < 1e-12);
    assert_eq!(spectral_entropy(&[3.0, 0.0, 0.0]), 0.0);
    assert_eq!(spectral_entropy(&[2.0]), 0.0);
    let mid = spectral_entropy(&[1.0, 0.5, 0.25]);
    assert!(mid > 0.0 && mid < 1.0);
    let identity = Mat::<f64>::identity(5, 5);
    assert!((weight_entropy(identity.as_ref()).unwrap() - 1.0).abs() < 1e-12);
    let rank_one = Mat::from_fn(4, 4, |i, j| (i + 1) as f64 * (j + 2) as f64);
    assert!(weight_entropy(rank_one.as_ref()).unwrap() < 1e-6);
}

#[test]
fn zero_dynamics_matrices() {
    let zero = Mat::<f64>::zeros(3, 3);
    let other = Mat::from_fn(3, 3, |i, j| (i + 2 * j) as f64);
    let options = OptimizerConfig::default();
    let same = align(zero.as_ref(), zero.as_ref(), &options).unwrap();
    assert_eq!(same.angular, 0.0);
    let one = align(zero.as_ref(), other.as_ref(), &options).unwrap();
    assert!((one.angular - std::f64::consts::FRAC_PI_2).abs() < 1e-12);
}

#[test]
fn different_sizes_are_zero_padded() {
    // A matrix against itself bordered by zeros: the padding makes them identical.
    let a = Mat::from_fn(3, 3, |i, j| ((i * 3 + j) as f64 * 0.7).sin());
    // Scale does not matter: both sides are normalised.
    let bordered = Mat::from_fn(
        5,
        5,
        |i, j| if i < 3 && j < 3 { 2.0 * a[(i, j)] } else { 0.0 },
    );
    let found = align(a.as_ref(), bordered.as_ref(), &OptimizerConfig::default()).unwrap();
    assert!(found.angular < 1e-6, "{}", found.angular);
    assert_eq!(found.transform.nrows(), 5);

    // Data with two extra silent features has the same shape.
    let x: Vec<f64> = (0..60).map(|i| (i as f64 * 0.37).sin()).collect();
    let wide: Vec<f64> = x
        .chunks(3)
        .flat_map(|r| [r[0], r[1], r[2], 0.0, 0.0])
        .collect();
    let (x, wide) = (
        Trajectories::from_2d(20, 3, x).unwrap(),
        Trajectories::from_2d(20, 5, wide).unwrap(),
    );
    assert!(dynexec_dsa::procrustes_angular(&x, &wide).unwrap() < 1e-6);
    assert!((dynexec_dsa::cka_linear(&x, &wide).unwrap() - 1.0).abs() < 1e-12);
}

#[test]
fn inconsistent_hankel_is_an_error() {
    let x = Trajectories::from_2d(10, 2, (0..20).map(|i| (i as f64).cos()).collect()).unwrap();
    let mut h = delay_embed(&x, 2, 1).unwrap();
    h.rows_per_trial = 1;
    h.trials = 9;
    assert!(matches!(
        Dmd::fit_hankel(&h, &DmdConfig::default()),
        Err(Error::Shape(_))
    ));
}
