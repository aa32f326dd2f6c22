from transformers import CLIPTokenizer

from stepdistill.toy.world import evaluation_prompts
from stepdistill.toy.tokenizer import BOS, EOS, build_toy_tokenizer, caption_word_counts


def test_every_caption_word_is_one_token_and_round_trips():
    tok = build_toy_tokenizer()
    for word in caption_word_counts():
        assert tok.tokenize(word) == [word + "</w>"]
    caption = evaluation_prompts(200)[123]
    ids = tok(caption).input_ids
    assert ids[0] == tok.convert_tokens_to_ids(BOS) and ids[-1] == tok.convert_tokens_to_ids(EOS)
    assert len(ids) == len(caption.split()) + 2
    assert tok.decode(ids, skip_special_tokens=True) == caption


def test_sd_text_context_padding():
    tok = build_toy_tokenizer()
    out = tok("a small red circle", padding="max_length", max_length=tok.model_max_length, truncation=True)
    assert tok.model_max_length == 77 and len(out.input_ids) == 77
    assert tok.pad_token == EOS  # SD 1.5 pads with <|endoftext|>


def test_unknown_words_fall_back_to_bytes():
    tok = build_toy_tokenizer()
    pieces = tok.tokenize("zebra")
    assert len(pieces) > 1 and "".join(pieces).replace("</w>", "") == "zebra"


def test_save_and_load_pretrained(tmp_path):
    tok = build_toy_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    caption = evaluation_prompts(10)[7]
    assert loaded(caption).input_ids == tok(caption).input_ids
    assert len(loaded) == len(tok)
