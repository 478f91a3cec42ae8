//! The Synthos-I2I pipeline: the demo components, the sampler, checkpoints over the DiT.

mod common;

use synthos_engine::data::demo::{render, Colour, DemoAttrs, Shape, ShapeSize, Texture};
use synthos_engine::image_io::RgbImage;
use synthos_engine::pipeline::{demo, GenerateOptions, SynthosPipeline};
use synthos_engine::{DType, Device};

fn demo_pipe() -> SynthosPipeline {
    SynthosPipeline::demo(Device::Cpu, DType::F32, &[]).unwrap()
}

fn small_opts() -> GenerateOptions {
    GenerateOptions {
        prompt: "a red circle on a blue background".into(),
        height: 32,
        width: 48,
        steps: 3,
        ..Default::default()
    }
}

#[test]
fn demo_tokenizer_maps_caption_words_and_appends_eos() {
    let pipe = demo_pipe();
    let vocab = demo::vocabulary();
    let ids = pipe.text.tokenizer.encode_cleaned("A Red circle, on a blue background").unwrap();
    let words: Vec<&str> = ids.iter().map(|&i| vocab[i as usize].as_str()).collect();
    assert_eq!(words, ["a", "red", "circle", "<unk>", "on", "a", "blue", "background", "</s>"]);
    // Every demo caption fits the text length with its </s>.
    for a in DemoAttrs::all() {
        let n = pipe.text.tokenizer.encode_cleaned(&a.caption()).unwrap().len();
        assert!(n <= demo::TEXT_LEN, "{} takes {n} tokens", a.caption());
    }
}

#[test]
fn demo_sample_has_the_requested_size_and_is_deterministic() {
    let pipe = demo_pipe();
    let opts = small_opts();
    let a = pipe.generate(&opts, None).unwrap();
    assert_eq!((a.width(), a.height()), (48, 32));
    let b = pipe.generate(&opts, None).unwrap();
    assert_eq!(a.data(), b.data(), "same seed, same image");
    let c = pipe.generate(&GenerateOptions { seed: 43, ..opts.clone() }, None).unwrap();
    assert_ne!(a.data(), c.data(), "another seed, another image");
}

#[test]
fn batched_prompts_equal_one_at_a_time() {
    let pipe = demo_pipe();
    let opts = small_opts();
    let prompts = ["a red circle on a blue background", "a small green square with dots on a white background"];
    let mut calls = 0;
    let batch = pipe.generate_batch(&prompts, &opts, None, &mut |_, _| calls += 1).unwrap();
    assert_eq!(calls, opts.steps);
    for (i, p) in prompts.iter().enumerate() {
        let one = GenerateOptions { prompt: p.to_string(), seed: opts.seed + i as u64, ..opts.clone() };
        let single = pipe.generate(&one, None).unwrap();
        let diff = batch[i].data().iter().zip(single.data()).map(|(a, b)| (*a as i32 - *b as i32).abs()).max().unwrap();
        assert!(diff <= 1, "image {i} differs by {diff} levels between batched and single sampling");
    }
}

#[test]
fn reference_image_changes_the_sample() {
    let pipe = demo_pipe();
    let opts = small_opts();
    let attrs = DemoAttrs {
        shape: Shape::Square,
        colour: Colour::Yellow,
        background: Colour::Purple,
        size: ShapeSize::Large,
        texture: Texture::Plain,
    };
    let img = render(&attrs, 64).unwrap();
    let reference = RgbImage::new(64, 64, img.data().to_vec()).unwrap();
    let with = pipe.generate(&opts, Some(&reference)).unwrap();
    let without = pipe.generate(&opts, None).unwrap();
    assert_ne!(with.data(), without.data());
}

#[test]
fn bad_sizes_and_arguments_are_reported() {
    let pipe = demo_pipe();
    let err = pipe.generate(&GenerateOptions { width: 30, ..small_opts() }, None).unwrap_err().to_string();
    assert!(err.contains("30×32") && err.contains("multiple of 8"), "{err}");
    let err = pipe.generate(&GenerateOptions { steps: 0, ..small_opts() }, None).unwrap_err().to_string();
    assert!(err.contains("steps"), "{err}");
}
