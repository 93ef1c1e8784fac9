//! Data: tokenization, padding and `group_texts` against transformers (the fixture from
//! `tests/parity/make_tokenizer_fixtures.py`), prompt/completion masking, and bad dataset files.

mod common;

use std::path::Path;

use runtime::data::dataset::{group_texts, load_examples, read_records, tokenize_texts};
use runtime::data::{pad_batch, Example, PadOptions, Padding, Side, Tokenizer};
use serde_json::Value;

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(common::fixtures().join("tokenizer_reference.json")).unwrap()).unwrap()
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&common::fixtures().join("tokenizer")).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn encode_and_decode_match_transformers() {
    let tok = tokenizer();
    assert_eq!(tok.bos.as_ref().unwrap().text, "<|bos|>");
    assert_eq!(tok.pad.as_ref().unwrap().id, 0);
    let r = reference();
    for case in r["encode"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let enc = tok.encode(text, true).unwrap();
        assert_eq!(enc.ids, ids(&case["ids"]), "{text:?}");
        let tokens: Vec<String> = case["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
        assert_eq!(enc.tokens, tokens, "{text:?}");
        assert_eq!(tok.encode(text, false).unwrap().ids, ids(&case["ids_no_special"]), "{text:?} without special tokens");
        assert_eq!(tok.decode(&enc.ids, false).unwrap(), case["decode"].as_str().unwrap(), "{text:?} decode");
        assert_eq!(tok.decode(&enc.ids, true).unwrap(), case["decode_skip_special"].as_str().unwrap(), "{text:?} decode skipping special tokens");
    }
}

#[test]
fn batch_padding_matches_transformers() {
    let tok = tokenizer();
    let r = reference();
    for (key, side) in [("batch_right", Side::Right), ("batch_left", Side::Left)] {
        let b = &r[key];
        let examples: Vec<Example> = b["texts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                let ids = tok.encode(t.as_str().unwrap(), true).unwrap().ids;
                Example { labels: ids.iter().map(|&x| x as i32).collect(), input_ids: ids }
            })
            .collect();
        let opts = PadOptions {
            padding: Padding::Longest,
            side,
            pad_id: tok.pad.as_ref().unwrap().id,
            max_length: Some(b["max_length"].as_u64().unwrap() as usize),
            truncation: true,
            pad_to_multiple_of: Some(b["pad_to_multiple_of"].as_u64().unwrap() as usize),
        };
        let batch = pad_batch(&examples, &opts).unwrap();
        let want_ids: Vec<i32> = b["input_ids"].as_array().unwrap().iter().flat_map(ids).map(|x| x as i32).collect();
        let want_mask: Vec<i32> = b["attention_mask"].as_array().unwrap().iter().flat_map(ids).map(|x| x as i32).collect();
        assert_eq!(batch.input_ids, want_ids, "{key}");
        assert_eq!(batch.attention_mask.as_ref().unwrap(), &want_mask, "{key}");
        let labels = batch.labels.unwrap();
        assert!(labels.iter().zip(&want_mask).all(|(l, m)| (*m == 0) == (*l == -100)), "{key}: labels -100 exactly on padding");
    }
    // transformers refuses to truncate to a length that padding would round up
    let opts = PadOptions { padding: Padding::Longest, side: Side::Right, pad_id: 0, max_length: Some(20), truncation: true, pad_to_multiple_of: Some(8) };
    assert!(pad_batch(&[Example::default()], &opts).unwrap_err().to_string().contains("multiple"));
}

#[test]
fn group_texts_matches_run_clm() {
    let tok = tokenizer();
    let r = &reference()["group_texts"];
    let path = common::fixtures().join(r["file"].as_str().unwrap());
    let records = read_records(&path).unwrap();
    let tokenized = tokenize_texts(&path, &records, &tok).unwrap();
    let block = r["block_size"].as_u64().unwrap() as usize;
    let blocks = group_texts(&tokenized, block);
    let want: Vec<Vec<u32>> = r["blocks"].as_array().unwrap().iter().map(ids).collect();
    assert_eq!(blocks.len(), want.len());
    for (b, w) in blocks.iter().zip(&want) {
        assert_eq!(&b.input_ids, w);
        assert_eq!(b.labels, w.iter().map(|&x| x as i32).collect::<Vec<_>>());
    }
    let (_, examples) = load_examples(&path, &tok, Some(block), None).unwrap();
    assert_eq!(examples, blocks);
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn prompt_completion_masks_the_prompt() {
    let tok = tokenizer();
    let tmp = tempfile::tempdir().unwrap();
    let p = write(tmp.path(), "pc.jsonl", "{\"prompt\": \"12+30=\", \"completion\": \"42\"}\n{\"prompt\": \"7+8=\", \"completion\": \"15\"}\n");
    let (_, ex) = load_examples(&p, &tok, None, None).unwrap();
    for (e, (prompt, completion)) in ex.iter().zip([("12+30=", "42"), ("7+8=", "15")]) {
        let pi = tok.encode(prompt, true).unwrap().ids;
        let ci = tok.encode(completion, false).unwrap().ids;
        let eos = tok.eos.as_ref().unwrap().id;
        assert_eq!(e.input_ids, [pi.clone(), ci.clone(), vec![eos]].concat());
        assert!(e.labels[..pi.len()].iter().all(|&l| l == -100));
        assert_eq!(e.labels[pi.len()..], ci.iter().chain([&eos]).map(|&x| x as i32).collect::<Vec<_>>()[..]);
    }
    // a prompt that fills max_seq_length leaves nothing to learn: an error naming the line
    let err = load_examples(&p, &tok, None, Some(3)).unwrap_err().to_string();
    assert!(err.contains("pc.jsonl:1") && err.contains("no completion tokens"), "{err}");
}

#[test]
fn bad_datasets_name_file_and_line() {
    let tok = tokenizer();
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        ("malformed.jsonl", "{\"text\": \"ok\"}\n{\"text\": \"broken\n", vec!["malformed.jsonl:2", "malformed JSON"]),
        ("notobj.jsonl", "{\"text\": \"ok\"}\n[1, 2]\n", vec!["notobj.jsonl:2", "JSON object"]),
        ("empty.jsonl", "\n\n", vec!["empty.jsonl", "empty"]),
        ("nofield.jsonl", "{\"body\": \"x\"}\n", vec!["nofield.jsonl:1", "text", "body"]),
        ("missing.jsonl", "{\"text\": \"a\"}\n{\"title\": \"b\"}\n", vec!["missing.jsonl:2", "missing field `text`"]),
        ("wrongtype.jsonl", "{\"text\": \"a\"}\n{\"text\": 5}\n", vec!["wrongtype.jsonl:2", "`text` must be a string"]),
        ("array.json", "{\"text\": \"a\"}", vec!["array.json", "array"]),
        ("short.jsonl", "{\"text\": \"a\"}\n", vec!["short.jsonl", "no examples"]),
        ("data.csv", "text\na\n", vec!["data.csv", ".jsonl"]),
        ("chat.jsonl", "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n", vec!["chat.jsonl:1", "no assistant tokens"]),
        ("role.jsonl", "{\"messages\": [{\"role\": \"robot\", \"content\": \"hi\"}]}\n", vec!["role.jsonl:1", "unknown role robot"]),
        ("shape.jsonl", "{\"messages\": [{\"content\": \"hi\"}]}\n", vec!["shape.jsonl:1", "messages[0]", "role"]),
    ];
    for (name, text, needles) in cases {
        let p = write(tmp.path(), name, text);
        let err = load_examples(&p, &tok, Some(64), None).unwrap_err().to_string();
        for n in needles {
            assert!(err.contains(n), "{name}: `{n}` not in `{err}`");
        }
    }
    let err = load_examples(&tmp.path().join("absent.jsonl"), &tok, None, None).unwrap_err().to_string();
    assert!(err.contains("absent.jsonl"), "{err}");
}

#[test]
fn chat_template_matches_transformers_and_labels_assistant_turns() {
    use runtime::data::chat::ChatTemplate;
    let tok = tokenizer();
    let tmpl = ChatTemplate::for_tokenizer(&tok).unwrap();
    for case in reference()["chat"].as_array().unwrap() {
        let messages = case["messages"].as_array().unwrap();
        assert_eq!(tmpl.render(messages, false).unwrap(), case["text"].as_str().unwrap());
        assert_eq!(tmpl.render(&messages[..messages.len() - 1], true).unwrap(), case["text_generation_prompt"].as_str().unwrap());
        let ex = tmpl.tokenize(&tok, messages).unwrap();
        assert_eq!(ex.input_ids, ids(&case["ids"]));
        // the labelled tokens are exactly the assistant replies, each with its end of turn
        let labelled: Vec<u32> = ex.labels.iter().filter(|&&l| l != -100).map(|&l| l as u32).collect();
        let want: String =
            messages.iter().filter(|m| m["role"] == "assistant").map(|m| format!("{}<|eos|>\n", m["content"].as_str().unwrap().trim())).collect();
        assert_eq!(tok.decode(&labelled, false).unwrap(), want);
    }
    let tmp = tempfile::tempdir().unwrap();
    let lines: String = reference()["chat"].as_array().unwrap().iter().map(|c| serde_json::json!({"messages": c["messages"]}).to_string() + "\n").collect();
    let p = write(tmp.path(), "chat.jsonl", &lines);
    let (kind, ex) = load_examples(&p, &tok, None, None).unwrap();
    assert_eq!(kind, runtime::data::RecordKind::Messages);
    assert_eq!(ex.len(), 2);
}

#[test]
fn tokenize_command_shows_tokens_padding_and_round_trip() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_runtime"))
        .args(["tokenize", "--model"])
        .arg(common::fixtures().join("tokenizer"))
        .args(["--text", "then to 12+3=15.", "--text", "hi", "--padding", "longest", "--padding_side", "left", "--pad_to_multiple_of", "8"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("\"<|bos|>\"  special"), "{stdout}");
    assert!(stdout.contains("(round trip exact)"), "{stdout}");
    assert!(stdout.contains("batch 2 x 16"), "{stdout}");
    assert!(stdout.contains("attention_mask [0, 0,"), "left padding puts zeros first: {stdout}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_runtime")).args(["tokenize", "--model", "/nonexistent", "--text", "x"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("tokenizer.json") && !err.contains("panicked"), "{err}");
}

#[test]
fn tokenization_is_cached_by_data_tokenizer_and_settings() {
    use runtime::data::cache::load_examples_cached;
    let tok = tokenizer();
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let data = write(tmp.path(), "d.jsonl", "{\"text\": \"12+30=42. then 7+8=15.\"}\n{\"text\": \"the model learns to add numbers quickly\"}\n");
    let (k1, e1, hit1) = load_examples_cached(&data, &tok, Some(8), None, Some(&cache), false).unwrap();
    let (k2, e2, hit2) = load_examples_cached(&data, &tok, Some(8), None, Some(&cache), false).unwrap();
    assert!(!hit1 && hit2, "the second load comes from the cache");
    assert_eq!((k1, &e1), (k2, &e2));
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 1);
    // other settings, other data, or overwrite_cache: computed again
    let (_, e3, hit3) = load_examples_cached(&data, &tok, Some(4), None, Some(&cache), false).unwrap();
    assert!(!hit3 && e3 != e1);
    std::fs::write(&data, "{\"text\": \"different text entirely, long enough for a block\"}\n").unwrap();
    let (_, e4, hit4) = load_examples_cached(&data, &tok, Some(8), None, Some(&cache), false).unwrap();
    assert!(!hit4 && e4 != e1);
    let (_, _, hit5) = load_examples_cached(&data, &tok, Some(8), None, Some(&cache), true).unwrap();
    assert!(!hit5, "overwrite_cache recomputes");
    // a corrupt entry is ignored and rebuilt
    for e in std::fs::read_dir(&cache).unwrap().flatten() {
        std::fs::write(e.path(), b"garbage").unwrap();
    }
    let (_, e6, hit6) = load_examples_cached(&data, &tok, Some(8), None, Some(&cache), false).unwrap();
    assert!(!hit6 && e6 == e4);
}

/// A text record longer than `LONG_TEXT_BYTES` is tokenized in pieces cut at whitespace (one
/// huge string costs a fast tokenizer far more memory than its size), and gives the same ids as
/// the whole text with byte-level BPE, the template's BOS once.
#[test]
fn a_huge_text_record_is_tokenized_in_pieces_with_the_same_ids() {
    let tok = tokenizer();
    let words = ["hello", "world,", "the", "quick", "brown", "fox's", "jumps!", "\u{fc}ber", "\u{1f642}", "12345", "  spaced"];
    let mut text = String::new();
    let mut i = 0;
    while text.len() < 3 * runtime::data::tokenizer::LONG_TEXT_BYTES {
        text += words[i % words.len()];
        text += if i % 7 == 0 { "\n" } else { " " };
        i += 1;
    }
    let whole = tok.encode(&text, true).unwrap().ids;
    assert_eq!(whole[0], tok.bos.as_ref().unwrap().id);
    assert!(tok.encode_text(&text).unwrap() == whole, "pieces and the whole text tokenize differently");
}
