import pytest

from tunelab.data import Example
from tunelab.errors import TunelabError
from tunelab.evaluation.rag import CONTEXT_HEADER, chunk_text, load_passages, query_text, rag_examples, tokenize, top_k

SYSTEM = {"role": "system", "content": "Answer with SQL."}


def ex(question: str, answer: str, source: str = "x", system: bool = True) -> Example:
    turns = ({"role": "user", "content": question}, {"role": "assistant", "content": answer})
    return Example(((SYSTEM,) if system else ()) + turns, source)


TRAIN = [
    ex("How many customers live in Paris?", "SELECT COUNT(*) FROM customers WHERE city = 'Paris'", "t:1"),
    ex("List the garden products cheaper than 30.", "SELECT name FROM products WHERE category = 'garden' AND price < 30", "t:2"),
    ex("What is the total stock of toys?", "SELECT SUM(stock) FROM products WHERE category = 'toys'", "t:3"),
    ex("Which customers ordered on day 3?", "SELECT DISTINCT customer_id FROM orders WHERE day = 3", "t:4"),
    ex("List the kitchen products cheaper than 50.", "SELECT name FROM products WHERE category = 'kitchen' AND price < 50", "t:5"),
    ex("Average price of books?", "SELECT AVG(price) FROM products WHERE category = 'books'", "t:6"),
]


def test_tokenize_is_lowercase_words():
    assert tokenize("How many Customers, in PARIS? x_1 42") == ["how", "many", "customers", "in", "paris", "x_1", "42"]


def test_retrieved_shots_are_the_lexically_closest_train_examples():
    target = ex("List the garden products cheaper than 20.", "SELECT name FROM products WHERE category = 'garden' AND price < 20", "e:1")
    [prompt] = rag_examples([target], TRAIN, k=2)
    users = [m["content"] for m in prompt.messages if m["role"] == "user"]
    # best match (garden ... cheaper than) nearest the question, second best (kitchen ... cheaper than) before it
    assert users == [TRAIN[4].messages[1]["content"], TRAIN[1].messages[1]["content"], target.messages[1]["content"]]
    assert [m["role"] for m in prompt.messages] == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert prompt.messages[0] == SYSTEM and prompt.messages[-1] == target.messages[-1] and prompt.source == "e:1"
    # the per-query choice differs from a fixed draw: a customers question retrieves the customers shots
    [other] = rag_examples([ex("How many customers are in Paris today?", "A", "e:2")], TRAIN, k=1)
    assert other.messages[1]["content"] == TRAIN[0].messages[1]["content"]


def test_query_never_uses_the_reference_answer_and_the_example_itself_is_never_retrieved():
    # the answer's words would match t:3, the question's words match t:1
    target = ex("How many customers live in Lyon?", "SELECT SUM(stock) FROM products WHERE category = 'toys'", "e:1")
    assert query_text(target) == "How many customers live in Lyon?"
    [prompt] = rag_examples([target], TRAIN, k=1)
    assert prompt.messages[1]["content"] == TRAIN[0].messages[1]["content"]
    # an eval set overlapping the train set: the duplicate is skipped, its answer never appears in the prompt
    duplicate = TRAIN[2]
    [prompt] = rag_examples([duplicate], TRAIN, k=len(TRAIN))
    answer = duplicate.messages[-1]["content"]
    assert all(m["content"] != answer for m in prompt.messages[:-1])
    assert len([m for m in prompt.messages if m["role"] == "user"]) == len(TRAIN)  # k-1 shots + the question


def test_ties_are_broken_by_train_order_and_runs_are_deterministic():
    train = [ex("alpha beta", f"a{i}", f"t:{i}") for i in range(4)]
    first = rag_examples([ex("alpha", "z")], train, k=2)
    assert first == rag_examples([ex("alpha", "z")], train, k=2)
    assert [m["content"] for m in first[0].messages if m["role"] == "assistant"][:2] == ["a1", "a0"]  # best (a0) last
    assert top_k("gamma", [["a"], ["b"], ["c"]], 2) == [0, 1]
    assert top_k("x", [[], []], 5) == [0, 1]


def test_no_system_message_and_k_larger_than_train():
    [prompt] = rag_examples([ex("total stock of toys", "A", system=False)], TRAIN[:2], k=5)
    assert [m["role"] for m in prompt.messages] == ["user", "assistant"] * 3


def test_chunking_keeps_paragraphs_whole():
    paragraphs = [f"Paragraph {n} " + "word " * 30 for n in range(5)]  # ~165 chars each
    text = "\n\n".join(p.strip() for p in paragraphs)
    chunks = chunk_text(text, chunk_chars=400)
    assert len(chunks) == 3
    assert all(len(c) <= 400 for c in chunks)
    for chunk in chunks:  # every paragraph is whole inside exactly one chunk
        assert all(p.strip() in text.split("\n\n") for p in chunk.split("\n\n"))
    assert "\n\n".join(chunks) == text
    long = "x" * 10 + " " + "y " * 300
    pieces = chunk_text(long, chunk_chars=100)
    assert all(len(p) <= 100 for p in pieces) and " ".join(pieces).split() == long.split()
    assert chunk_text("  \n\n \n") == []


def test_documents_mode_builds_the_context_inside_the_last_user_message(tmp_path):
    (tmp_path / "b_paris.md").write_text("# Paris\n\nParis is the capital of France.\n\nThe Eiffel tower is in Paris.", encoding="utf-8")
    (tmp_path / "a_rome.txt").write_text("Rome is the capital of Italy. The Colosseum is in Rome.", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c_berlin.txt").write_text("Berlin is the capital of Germany.", encoding="utf-8")
    (tmp_path / "ignored.csv").write_text("Paris,Paris,Paris", encoding="utf-8")
    passages = load_passages(tmp_path, chunk_chars=60)
    assert [p.source for p in passages] == ["a_rome.txt#1", "b_paris.md#1", "b_paris.md#2", "sub/c_berlin.txt#1"]
    assert passages[1].text == "# Paris\n\nParis is the capital of France."

    target = ex("What is the capital city of Italy?", "Rome", "e:1")
    [prompt] = rag_examples([target], [], k=2, documents=str(tmp_path), chunk_chars=60)
    assert prompt.messages[0] == SYSTEM and len(prompt.messages) == 3 and prompt.messages[-1] == target.messages[-1]
    content = prompt.messages[1]["content"]
    assert content.startswith(CONTEXT_HEADER + "\n\n[1] Rome is the capital of Italy.")
    assert "\n\n[2] " in content and "[3]" not in content
    assert content.endswith("\n\nQuestion: What is the capital city of Italy?")
    assert target.messages[1]["content"] == "What is the capital city of Italy?"  # the input is not mutated


def test_errors(tmp_path):
    with pytest.raises(TunelabError, match="k >= 1"):
        rag_examples([TRAIN[0]], TRAIN, k=0)
    with pytest.raises(TunelabError, match="no examples"):
        rag_examples([TRAIN[0]], [], k=1)
    with pytest.raises(TunelabError, match="does not exist"):
        rag_examples([TRAIN[0]], TRAIN, k=1, documents=str(tmp_path / "missing"))
    with pytest.raises(TunelabError, match="no .txt or .md"):
        rag_examples([TRAIN[0]], TRAIN, k=1, documents=str(tmp_path))
    (tmp_path / "empty.md").write_text("\n\n", encoding="utf-8")
    with pytest.raises(TunelabError, match="empty"):
        rag_examples([TRAIN[0]], TRAIN, k=1, documents=str(tmp_path))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(TunelabError, match="not UTF-8"):
        load_passages(tmp_path)
