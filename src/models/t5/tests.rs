use std::collections::HashMap;

use candle_core::{Device, Tensor};

use super::config::relative_bucket;
use super::*;
use crate::rng::Rng;

#[test]
fn relative_buckets_follow_t5s_definition() {
    // Encoder (bidirectional), 32 buckets up to 128: 16 per direction, 8 exact, then logarithmic
    // (8 + ⌊ln(d/8) / ln(16) · 8⌋), capped at 15; keys after the query add 16.
    let enc = |r| relative_bucket(r, true, 32, 128);
    assert_eq!([enc(0), enc(-1), enc(-7), enc(1), enc(7)], [0, 1, 7, 17, 23]);
    assert_eq!(enc(-8), 8);
    assert_eq!(enc(-20), 10); // ln(2.5)/ln(16)·8 = 2.64
    assert_eq!(enc(20), 26);
    assert_eq!([enc(-127), enc(-200), enc(5000)], [15, 15, 31]);
    // Decoder (past only): 32 buckets, 16 exact; future keys fall in bucket 0.
    let dec = |r| relative_bucket(r, false, 32, 128);
    assert_eq!([dec(5), dec(0), dec(-3), dec(-15)], [0, 0, 3, 15]);
    assert_eq!(dec(-20), 17); // 16 + ⌊ln(1.25)/ln(8)·16⌋ = 16 + 1
    assert_eq!(dec(-1000), 31);
}

fn tiny_config(gated: bool, tied: bool) -> T5Config {
    T5Config::from_json(serde_json::json!({
        "model_type": "t5", "vocab_size": 30, "d_model": 16, "d_kv": 4, "d_ff": 24, "num_layers": 2,
        "num_decoder_layers": 3, "num_heads": 2, "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 12,
        "feed_forward_proj": if gated { "gated-gelu" } else { "relu" }, "tie_word_embeddings": tied
    }))
    .unwrap()
}

fn random_weights(c: &T5Config) -> HashMap<String, Tensor> {
    let mut rng = Rng::new(11);
    let mut t = |shape: &[usize]| {
        let n: usize = shape.iter().product();
        Tensor::from_vec((0..n).map(|_| rng.next_f32() - 0.5).collect::<Vec<f32>>(), shape, &Device::Cpu).unwrap()
    };
    let (d, inner) = (c.d_model, c.inner_dim());
    let mut w = HashMap::new();
    w.insert("shared.weight".to_string(), t(&[c.vocab_size, d]));
    if !c.tie_word_embeddings {
        w.insert("lm_head.weight".into(), t(&[c.vocab_size, d]));
    }
    for (stack, layers, decoder) in [("encoder", c.num_layers, false), ("decoder", c.num_decoder_layers, true)] {
        w.insert(
            format!("{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
            t(&[c.relative_attention_num_buckets, c.num_heads]),
        );
        w.insert(format!("{stack}.final_layer_norm.weight"), (t(&[d]) + 1.0).unwrap());
        for i in 0..layers {
            let p = format!("{stack}.block.{i}.layer");
            let mut attentions = vec![format!("{p}.0.SelfAttention")];
            if decoder {
                attentions.push(format!("{p}.1.EncDecAttention"));
            }
            for a in attentions {
                for m in ["q", "k", "v"] {
                    w.insert(format!("{a}.{m}.weight"), t(&[inner, d]));
                }
                w.insert(format!("{a}.o.weight"), t(&[d, inner]));
            }
            let sublayers = if decoder { 3 } else { 2 };
            for l in 0..sublayers {
                w.insert(format!("{p}.{l}.layer_norm.weight"), (t(&[d]) + 1.0).unwrap());
            }
            let ff = format!("{p}.{}.DenseReluDense", sublayers - 1);
            let ins: &[&str] = if c.gated { &["wi_0", "wi_1"] } else { &["wi"] };
            for m in ins {
                w.insert(format!("{ff}.{m}.weight"), t(&[c.d_ff, d]));
            }
            w.insert(format!("{ff}.wo.weight"), t(&[d, c.d_ff]));
        }
    }
    w
}

/// Decoding one token at a time over the cache gives the teacher-forced logits, with padding in
/// the encoder batch masked out (the padded row equals the same prompt alone).
#[test]
fn incremental_decoding_equals_teacher_forcing() {
    for (gated, tied) in [(false, true), (true, false)] {
        let c = tiny_config(gated, tied);
        let model = T5::new(c.clone(), random_weights(&c), Adaptation::None).unwrap();
        let ctx = ForwardCtx::inference();
        let ids = Tensor::new(&[[5u32, 9, 3, 14, 1], [7, 2, 1, 0, 0]], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[1f32, 1., 1., 1., 1.], [1., 1., 1., 0., 0.]], &Device::Cpu).unwrap();
        let dec = Tensor::new(&[[0u32, 4, 8, 15, 16, 23, 42 % 30]], &Device::Cpu).unwrap();
        let dec = Tensor::cat(&[&dec, &dec], 0).unwrap();
        let full = model.forward(&ids, &mask, &dec, &ctx).unwrap();
        let encoded = model.encode(&ids, &mask, &ctx).unwrap();
        let mut cache = model.start_decoding(&encoded, &mask, &ctx).unwrap();
        let steps: Vec<Tensor> = (0..7)
            .map(|i| {
                let hidden = model.decode(&dec.narrow(1, i, 1).unwrap(), &mut cache, &ctx).unwrap();
                model.logits(&hidden, &ctx).unwrap()
            })
            .collect();
        let stepped = Tensor::cat(&steps, 1).unwrap();
        let diff = max_abs_diff(&full, &stepped);
        assert!(diff < 1e-4, "gated {gated}: incremental decoding differs by {diff}");
        // The padded second row equals its prompt alone.
        let alone = model
            .forward(
                &ids.narrow(0, 1, 1).unwrap().narrow(1, 0, 3).unwrap(),
                &mask.narrow(0, 1, 1).unwrap().narrow(1, 0, 3).unwrap(),
                &dec.narrow(0, 1, 1).unwrap(),
                &ctx,
            )
            .unwrap();
        let diff = max_abs_diff(&full.narrow(0, 1, 1).unwrap(), &alone);
        assert!(diff < 1e-4, "gated {gated}: padding changes the output by {diff}");
    }
}

#[test]
fn tied_checkpoints_may_name_the_embedding_after_the_encoder() {
    let c = tiny_config(false, true);
    let mut w = random_weights(&c);
    let shared = w.remove("shared.weight").unwrap();
    w.insert("encoder.embed_tokens.weight".into(), shared.clone());
    w.insert("decoder.embed_tokens.weight".into(), shared);
    let model = T5::new(c.clone(), w, Adaptation::Full).unwrap();
    let names: Vec<&str> = model.trainable.params.iter().map(|p| p.name.as_str()).collect();
    assert!(names.contains(&"shared.weight"));
    assert!(!names.iter().any(|n| n.contains("embed_tokens") || n.contains("lm_head")), "{names:?}");
    assert!(model.tied_head);
    // As transformers 5: a checkpoint without `lm_head.weight`, or with a copy of the embedding,
    // is tied whatever the config says; a different `lm_head.weight` is a separate head.
    let untied_config = tiny_config(false, false);
    let mut w = random_weights(&untied_config);
    let head = w.remove("lm_head.weight").unwrap();
    assert!(T5::new(untied_config.clone(), w.clone(), Adaptation::None).unwrap().tied_head);
    w.insert("lm_head.weight".into(), w["shared.weight"].clone());
    assert!(T5::new(untied_config.clone(), w.clone(), Adaptation::None).unwrap().tied_head);
    w.insert("lm_head.weight".into(), head);
    let model = T5::new(untied_config, w, Adaptation::Full).unwrap();
    assert!(!model.tied_head);
    assert!(model.trainable.params.iter().any(|p| p.name == "lm_head.weight"));
}

#[test]
fn config_reads_the_feed_forward_variant() {
    let c = tiny_config(true, false);
    assert!(c.gated);
    assert_eq!(c.activation, config::Activation::GeluTanh);
    let mut raw = c.raw.clone();
    raw["feed_forward_proj"] = "gelu".into();
    assert_eq!(T5Config::from_json(raw.clone()).unwrap().activation, config::Activation::GeluErf);
    raw["feed_forward_proj"] = "gated-tanhshrink".into();
    assert!(T5Config::from_json(raw).is_err());
    // The decoder output's scaling: transformers 5's key, else the legacy meaning of
    // `tie_word_embeddings` (original T5 scales, v1.1 writes `false` and does not).
    assert!(!c.scale_decoder_outputs);
    assert!(tiny_config(false, true).scale_decoder_outputs);
    let mut raw = tiny_config(true, true).raw;
    raw["scale_decoder_outputs"] = false.into();
    assert!(!T5Config::from_json(raw.clone()).unwrap().scale_decoder_outputs);
    raw.as_object_mut().unwrap().remove("tie_word_embeddings");
    raw.as_object_mut().unwrap().remove("scale_decoder_outputs");
    assert!(T5Config::from_json(raw).unwrap().scale_decoder_outputs);
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}
