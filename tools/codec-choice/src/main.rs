//! Compression ratio and speed of candidate codecs on cross-region link batches. The
//! batches mimic `ShipBatch`: postcard-encoded changes (dataset, key, version, value) of
//! 256-byte values, either realistic JSON documents or random alphanumeric text.

use std::time::Instant;
use rand::Rng;
use serde::Serialize;

#[derive(Serialize, Clone)]
struct Version { wall: u64, logical: u16, region: String, seq: u64 }
#[derive(Serialize, Clone)]
struct Change { dataset: String, key: String, version: Version, value: Option<Vec<u8>> }
#[derive(Serialize, Clone)]
struct Batch { source: String, from: u64, upto: u64, policy: Option<String>, epoch: u64, changes: Vec<Change>, early: Vec<Change> }

const WORDS: &[&str] = &["lamp","desk","chair","blue","red","green","oak","steel","small","large","office","home","garden","kitchen","light","shelf","table","cable","glass","paper"];

fn value(rng: &mut impl Rng, kind: u8, len: usize) -> Vec<u8> {
    match kind {
        // realistic JSON document
        0 => {
            let mut s = format!("{{\"id\":\"{:016x}\",\"name\":\"{} {}\",\"price\":{}.{:02},\"stock\":{},\"tags\":[\"{}\",\"{}\"],\"note\":\"",
                rng.random::<u64>(), WORDS[rng.random_range(0..20)], WORDS[rng.random_range(0..20)], rng.random_range(1..999), rng.random_range(0..100), rng.random_range(0..10000), WORDS[rng.random_range(0..20)], WORDS[rng.random_range(0..20)]);
            while s.len() < len - 2 { s.push_str(WORDS[rng.random_range(0..20)]); s.push(' '); }
            s.truncate(len - 2); s.push_str("\"}"); s.into_bytes()
        }
        // random alphanumeric string (incompressible-ish text)
        _ => {
            const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
            let mut v = vec![b'"'];
            for _ in 0..len - 2 { v.push(A[rng.random_range(0..A.len())]); }
            v.push(b'"'); v
        }
    }
}

fn main() {
    let mut rng = rand::rng();
    for kind in [0u8, 1] {
        for n in [1usize, 16, 256] {
            let mut batches = Vec::new();
            for b in 0..50 {
                let changes: Vec<Change> = (0..n).map(|i| Change {
                    dataset: "catalog".into(), key: format!("sku-{:08}", b * n + i),
                    version: Version { wall: 1_790_000_000_000 + (b*n+i) as u64, logical: 0, region: "us-east".into(), seq: (b*n+i) as u64 + 1 },
                    value: Some(value(&mut rng, kind, 256)) }).collect();
                batches.push(postcard::to_stdvec(&Batch { source: "us-east".into(), from: 1, upto: 1000, policy: Some("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".into()), epoch: 3, changes, early: vec![] }).unwrap());
            }
            let raw: usize = batches.iter().map(|b| b.len()).sum();
            let kv: usize = n * 50 * (12 + 256);
            println!("kind={} changes/batch={} raw/kv={:.3}", if kind==0 {"json-doc"} else {"random-text"}, n, raw as f64 / kv as f64);
            let run = |name: &str, f: &dyn Fn(&[u8]) -> Vec<u8>, d: &dyn Fn(&[u8], usize) -> Vec<u8>| {
                let reps = 20;
                let t = Instant::now();
                let mut out = 0;
                let mut comp = Vec::new();
                for _ in 0..reps { comp = batches.iter().map(|b| f(b)).collect::<Vec<_>>(); out = comp.iter().map(|c| c.len()).sum::<usize>(); }
                let ct = t.elapsed().as_secs_f64() / reps as f64;
                let t = Instant::now();
                for _ in 0..reps { for (c, b) in comp.iter().zip(&batches) { let x = d(c, b.len()); assert_eq!(x.len(), b.len()); } }
                let dt = t.elapsed().as_secs_f64() / reps as f64;
                println!("  {name:10} wire/raw={:.3} wire/kv={:.3} compress={:.0} MB/s decompress={:.0} MB/s", out as f64 / raw as f64, out as f64 / kv as f64, raw as f64 / ct / 1e6, raw as f64 / dt / 1e6);
            };
            run("none", &|b| b.to_vec(), &|c, _| c.to_vec());
            run("lz4_flex", &|b| lz4_flex::compress_prepend_size(b), &|c, _| lz4_flex::decompress_size_prepended(c).unwrap());
            run("snappy", &|b| snap::raw::Encoder::new().compress_vec(b).unwrap(), &|c, _| snap::raw::Decoder::new().decompress_vec(c).unwrap());
            run("zstd-1", &|b| zstd::bulk::compress(b, 1).unwrap(), &|c, n| zstd::bulk::decompress(c, n).unwrap());
            run("zstd-3", &|b| zstd::bulk::compress(b, 3).unwrap(), &|c, n| zstd::bulk::decompress(c, n).unwrap());
            run("deflate-1", &|b| { use std::io::Write; let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::new(1)); e.write_all(b).unwrap(); e.finish().unwrap() }, &|c, n| { use std::io::Read; let mut d = flate2::read::DeflateDecoder::new(c); let mut v = Vec::with_capacity(n); d.read_to_end(&mut v).unwrap(); v });
            run("deflate-6", &|b| { use std::io::Write; let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::new(6)); e.write_all(b).unwrap(); e.finish().unwrap() }, &|c, n| { use std::io::Read; let mut d = flate2::read::DeflateDecoder::new(c); let mut v = Vec::with_capacity(n); d.read_to_end(&mut v).unwrap(); v });
        }
    }
}
