"""model/chat_template.py and data/prompts.py: a base's chat template, rendered and tokenized as transformers'
``apply_chat_template`` does, used by every reader, the evaluations, the demo and train.py, and recorded in the run.

The two templates are the real ones, character for character, from the tokenizer_config.json of
meta-llama/Llama-2-7b-chat-hf and meta-llama/Meta-Llama-3-8B-Instruct. The tokenizers are tiny stand-ins of the
same kinds: Meta's sentencepiece model (with the tokenizer.json transformers reads for it) and Llama-3's byte-level
BPE tokenizer.json with its header / end-of-turn special tokens.
"""

import json

import pytest
import torch
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer

import train
from app.engine import Engine, Turn
from data.collate import IGNORE_INDEX, Collator, Example
from data.llava import Conversation, to_examples
from data.prompts import ALPACA, PromptTemplate, Query, load_prompt_template
from data.scienceqa import build_prompt, load_problems, to_example
from data.synthetic import make_alpaca, make_scienceqa, synthetic_corpus, train_tokenizer
from model import load_model
from model.chat_template import ChatTemplate, ChatTemplateError, encode_prompt, find_chat_template
from model.checkpoint import CheckpointError, save_adapter
from model.checkpoint.hf_export import write_hf
from model.generate import generate, stop_ids
from model.tokenizer import load_tokenizer

LLAMA2_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
LLAMA3_INSTRUCT = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
QUERY = Query("What colour is the shape?", history=(("Is there a shape?", "Yes, one."),))


def _added_token(content: str) -> dict:
    """A special token as Llama-2's tokenizer_config.json writes it (an AddedToken object, not a string)."""
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False}  # fmt: skip


@pytest.fixture(scope="module")
def llama2_dir(tmp_path_factory):
    """A Llama-2-chat-style folder: sentencepiece tokenizer.model, the tokenizer.json transformers reads for it, and
    tokenizer_config.json with the real chat template and AddedToken-object special tokens."""
    folder = tmp_path_factory.mktemp("llama2-chat")
    train_tokenizer(synthetic_corpus(seed=0, n=400), folder / "tokenizer.model")
    for name, content in load_tokenizer(folder / "tokenizer.model").hf_files().items():
        (folder / name).write_bytes(content)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config |= {"bos_token": _added_token("<s>"), "eos_token": _added_token("</s>"), "chat_template": LLAMA2_CHAT}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _llama3_dir(folder, eos: str):
    tok = RawTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=LLAMA3_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(synthetic_corpus(seed=0, n=300), trainer=trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": eos,
              "chat_template": LLAMA3_INSTRUCT, "clean_up_tokenization_spaces": True}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    """A Llama-3-instruct-style folder (byte-level BPE tokenizer.json, 512 tokens as the tiny preset); EOS is
    <|eot_id|> as in the current file."""
    return _llama3_dir(tmp_path_factory.mktemp("llama3-instruct"), "<|eot_id|>")


@pytest.fixture(params=["llama2", "llama3"])
def chat_dir(request, llama2_dir, llama3_dir):
    return {"llama2": llama2_dir, "llama3": llama3_dir}[request.param]


def test_prompts_read_and_tokenize_as_transformers_apply_chat_template(chat_dir):
    ours, theirs = load_tokenizer(chat_dir), AutoTokenizer.from_pretrained(str(chat_dir))
    template = load_prompt_template("chat-template", chat_dir)
    messages = QUERY.messages()
    prompt = template.prompt(QUERY)
    assert prompt == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected_ids = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert encode_prompt(ours, prompt, template.chat_template) == list(expected_ids)


def test_the_real_templates_give_the_published_prompt_text(llama2_dir, llama3_dir):
    assert load_prompt_template("chat-template", llama2_dir).prompt(QUERY) == (
        "<s>[INST] Is there a shape? [/INST] Yes, one. </s><s>[INST] What colour is the shape? [/INST]"
    )
    assert load_prompt_template("chat-template", llama3_dir).prompt(Query("Hi", "Be brief.")) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_a_training_example_is_the_whole_conversation_with_the_loss_on_the_reply_and_its_end_of_turn(chat_dir):
    tokenizer, theirs = load_tokenizer(chat_dir), AutoTokenizer.from_pretrained(str(chat_dir))
    template = load_prompt_template("chat-template", chat_dir)
    prompt, target = template.example(QUERY, "It is red.")
    batch = Collator(tokenizer, 512, chat_template=template.chat_template)([Example(prompt, target)])
    conversation = [*QUERY.messages(), {"role": "assistant", "content": "It is red."}]
    whole = list(theirs.apply_chat_template(conversation, tokenize=True, return_dict=False))
    n_prompt = len(theirs.apply_chat_template(QUERY.messages(), add_generation_prompt=True, return_dict=False))
    assert batch["tokens"][0].tolist() == whole  # no BOS or EOS of ours added: the template's own
    labels = batch["labels"][0].tolist()
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and labels[n_prompt:] == whole[n_prompt:]
    reply = tokenizer.decode(whole[n_prompt:])
    assert reply.strip() == "It is red."
    assert whole[-1] in template.chat_template.stop_ids(tokenizer)  # the model learns to end its turn


def _tiny(tokenizer, template: PromptTemplate):
    model = load_model("tiny")  # a random tiny base: vocabulary 512, as both stand-in tokenizers
    model.tokenizer, model.chat_template = tokenizer, template.chat_template
    return model


def test_generation_stops_at_the_end_of_turn_token_also_when_eos_is_another(tmp_path):
    folder = _llama3_dir(tmp_path, "<|end_of_text|>")  # the first Llama-3 release named <|end_of_text|> as EOS
    tokenizer = load_tokenizer(folder)
    template = load_prompt_template("chat-template", folder)
    eot = tokenizer.encode("<|eot_id|>", bos=False)[0]
    assert tokenizer.eos_id != eot
    model = _tiny(tokenizer, template)
    assert stop_ids(model) == [tokenizer.eos_id, eot]
    with torch.no_grad():  # the next token is always <|eot_id|>
        model.output.weight.zero_()
        model.output.weight[eot] = 1.0
    assert generate(model, template.prompt(Query("Hi")), max_new_tokens=5, temperature=0.0) == ""
    model.chat_template = None  # the Alpaca prompts stop at EOS only: the reply runs on
    assert stop_ids(model) == [tokenizer.eos_id]


def test_every_reader_prompts_with_the_template(tmp_path, llama2_dir):
    template = load_prompt_template("chat-template", llama2_dir)
    make_scienceqa(tmp_path / "sqa", n_train=2, n_val=1, n_test=1)
    problem = load_problems(tmp_path / "sqa", "train")[0]
    example = to_example(problem, template=template)
    assert example.prompt == f"<s>[INST] {build_prompt(problem)} [/INST]"
    assert example.target == " The answer is (" + problem.answer_letter + ") </s>"
    assert to_example(problem).prompt == build_prompt(problem)  # Alpaca: ScienceQA's own layout as it is
    conversation = Conversation(tmp_path / "x.png", [("Colour?", "Red."), ("Size?", "Big.")], 0, "c")
    second = to_examples(conversation, template)[1]
    assert second.prompt == "<s>[INST] Colour? [/INST] Red. </s><s>[INST] Size? [/INST]"
    assert second.target == " Big. </s>"
    from data.alpaca import load_examples
    from data.coco import caption_prompt

    record = load_examples(make_alpaca(tmp_path / "alpaca.json", n=3), template=template)[0]
    assert record.prompt.startswith("<s>[INST] ") and "### " not in record.prompt
    assert caption_prompt(template) == "<s>[INST] Generate caption of this image [/INST]"
    assert ALPACA.prompt(Query("Generate caption of this image")) == caption_prompt()


def test_the_demo_prompts_with_the_runs_template_and_drops_the_alpaca_stops(llama2_dir):
    tokenizer = load_tokenizer(llama2_dir)
    engine = Engine(_tiny(tokenizer, load_prompt_template("chat-template", llama2_dir)))
    reply = engine.chat([Turn("Is there a shape?", "Yes, one.")], "What colour is the shape?", max_new_tokens=2)
    assert reply.prompt == load_prompt_template("chat-template", llama2_dir).prompt(QUERY)
    "".join(reply)
    assert engine.chat_stop == () and engine.question_stop == ()
    question = engine.answer("Which?", choices=["red", "blue"], max_new_tokens=2)
    assert question.prompt.startswith("<s>[INST] Question: Which?") and question.prompt.endswith("Answer: [/INST]")
    plain = Engine(_tiny(tokenizer, ALPACA))
    assert plain.chat([], "Hi", max_new_tokens=1).prompt.startswith("Below is an instruction")


def test_where_a_template_is_found_and_what_is_refused(tmp_path):
    assert find_chat_template(tmp_path) is None
    with pytest.raises(ValueError, match="holds no chat template.*--data.prompt_template alpaca"):
        load_prompt_template("chat-template", tmp_path)
    with pytest.raises(ValueError, match="choose one of alpaca, chat-template"):
        load_prompt_template("chatml", tmp_path)
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"eos_token": "</s>", "chat_template": [
        {"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ eos_token }}"}]}))  # fmt: skip
    found = find_chat_template(tmp_path)
    assert (found.source, found.eos_token, found.origin) == ("{{ eos_token }}", "</s>", str(config))
    (tmp_path / "chat_template.jinja").write_text("J{{ bos_token }}")  # transformers >= 4.50 writes this file
    assert find_chat_template(tmp_path).source == "J{{ bos_token }}"
    (tmp_path / "chat_template.jinja").unlink()
    config.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "T"}]}))
    with pytest.raises(
        ChatTemplateError, match="tokenizer_config.json: chat_template lists templates named 'tool_use'"
    ):
        find_chat_template(tmp_path)
    config.write_text('{"chat_template": ')
    with pytest.raises(ChatTemplateError, match="tokenizer_config.json: invalid JSON"):
        find_chat_template(tmp_path)
    broken = ChatTemplate(LLAMA2_CHAT, "<s>", "</s>", "base/tokenizer_config.json")
    with pytest.raises(ChatTemplateError, match="base/tokenizer_config.json: .*roles must alternate"):
        broken.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], add_generation_prompt=True)
    with pytest.raises(ChatTemplateError, match="x.jinja: the chat template failed"):
        ChatTemplate("{% for %}", None, None, "x.jinja").render([], add_generation_prompt=True)


def test_a_run_trained_with_the_chat_template_records_it_and_is_served_with_it(tmp_path, llama2_dir):
    data = make_alpaca(tmp_path / "alpaca.json", n=8)
    out = tmp_path / "run"
    argv = ["--recipe", "alpaca", "--base", "tiny", "--tokenizer", str(llama2_dir / "tokenizer.model"),
            "--data", str(data), "--data.prompt_template", "chat-template", "--model.method", "lora",
            "--optim.max_steps", "2", "--optim.batch_size", "2", "--run.device", "cpu", "--out", str(out),
            "--run.progress", "false", "--run.tensorboard", "false"]  # fmt: skip
    assert train.main(argv) == 0
    sidecar = json.loads((out / "adapter.json").read_text())
    assert sidecar["chat_template"]["source"] == LLAMA2_CHAT
    assert json.loads((out / "config.json").read_text())["data"]["prompt_template"] == "chat-template"
    model = load_model("tiny", out)
    assert model.chat_template.source == LLAMA2_CHAT and model.chat_template.eos_token == "</s>"
    assert Engine(model).chat([], "Hi", max_new_tokens=1).prompt == "<s>[INST] Hi [/INST]"
    save_adapter(model, tmp_path / "again", base="tiny")  # a re-save keeps it
    assert load_model("tiny", tmp_path / "again").chat_template == model.chat_template
    exported = write_hf(model, tmp_path / "hf")  # a merged checkpoint is served in the format it was trained in
    served = AutoTokenizer.from_pretrained(str(exported))
    assert served.apply_chat_template(QUERY.messages(), tokenize=False, add_generation_prompt=True) == (
        PromptTemplate(model.chat_template).prompt(QUERY)
    )

    sidecar["chat_template"] = {"source": 5}
    (out / "adapter.json").write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointError, match="adapter.json: chat_template must be an object with a non-empty"):
        load_model("tiny", out)


def test_a_base_without_a_chat_template_is_refused_before_training(tmp_path, capsys):
    data = make_alpaca(tmp_path / "alpaca.json", n=4)
    train_tokenizer(synthetic_corpus(seed=0, n=400), tmp_path / "tok" / "tokenizer.model")
    argv = ["--recipe", "alpaca", "--base", "tiny", "--tokenizer", str(tmp_path / "tok" / "tokenizer.model"),
            "--data", str(data), "--data.prompt_template", "chat-template", "--model.method", "lora",
            "--run.device", "cpu", "--out", str(tmp_path / "run")]  # fmt: skip
    assert train.main(argv) != 0
    assert "holds no chat template" in capsys.readouterr().err


def test_the_scienceqa_evaluation_prompts_with_the_template_and_their_logs_record_it(tmp_path, llama2_dir):
    from eval.scienceqa import predict

    template = load_prompt_template("chat-template", llama2_dir)
    model = _tiny(load_tokenizer(llama2_dir), template)
    seen: list[str] = []
    encode = model.tokenizer.encode
    model.tokenizer.encode = lambda text, *a, **k: seen.append(text) or encode(text, *a, **k)
    make_scienceqa(tmp_path / "sqa", n_train=1, n_val=1, n_test=2)
    problems = load_problems(tmp_path / "sqa", "test")
    predict(model, problems, tmp_path / "out", prompt_format="llama_adapter", header={}, max_new_tokens=1)
    assert f"<s>[INST] {build_prompt(problems[0])} [/INST]" in seen
    assert template.chat_template.sha256 in (tmp_path / "out" / "generations.jsonl").read_text()
