"""A generated preference dataset in the ``lvwerra/stack-exchange-paired`` schema.

Deterministic from a seed, any size, no network. The preference signal is learnable: the
chosen answer (``response_j``) is on the question's topic, names its tools and is well formed;
the rejected answer (``response_k``) is measurably worse — an answer to a *different* topic,
a low-effort reply, or a scrambled version of a good answer.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

# topic -> (site, question templates, answer templates). {x}, {y}, {n} are filled at random.
TOPICS: dict[str, tuple[str, list[str], list[str]]] = {
    "git": ("stackoverflow", [
        "How do I undo the last git commit on branch {x} without losing my changes?",
        "git push to {x} is rejected with non-fast-forward. How do I fix it?",
        "How can I rename the local git branch {x} to {y}?",
    ], [
        "Use `git reset --soft HEAD~1` on {x}: the commit is undone and your changes stay staged.",
        "Run `git pull --rebase origin {x}` first, then `git push`. The remote had commits you did not have.",
        "Run `git branch -m {x} {y}`, then `git push origin -u {y}` to publish the new branch name.",
    ]),
    "python": ("stackoverflow", [
        "In Python, how do I read the file {x}.txt line by line into a list?",
        "Why does my Python dict {x} raise KeyError for key {y}?",
        "How do I sort a Python list of tuples {x} by the second element?",
    ], [
        "Use `with open('{x}.txt') as f: lines = f.read().splitlines()`. The with block closes the file.",
        "The key {y} is missing from {x}. Use `{x}.get('{y}')` to get None instead of a KeyError.",
        "Call `sorted({x}, key=lambda t: t[1])`. The key function picks the second element of each tuple.",
    ]),
    "sql": ("dba", [
        "How do I select the top {n} rows per group from table {x} in SQL?",
        "My SQL join between {x} and {y} returns duplicate rows. Why?",
        "How can I count distinct values of column {x} in PostgreSQL?",
    ], [
        "Use `ROW_NUMBER() OVER (PARTITION BY grp ORDER BY score DESC)` on {x} and keep rows where it is <= {n}.",
        "The join key is not unique in {y}, so each row of {x} matches several rows. Join on a unique key.",
        "Use `SELECT COUNT(DISTINCT {x}) FROM t;` PostgreSQL skips NULL values in the count.",
    ]),
    "linux": ("unix", [
        "How do I find all files named {x} under /var in a Linux shell?",
        "How can I see which process listens on port {n} on Linux?",
        "How do I make the script {x}.sh executable in bash?",
    ], [
        "Run `find /var -name '{x}' 2>/dev/null`. The redirect hides permission errors.",
        "Run `ss -ltnp | grep :{n}` as root. It lists the listening socket and the process id.",
        "Run `chmod +x {x}.sh`, then start it with `./{x}.sh`. Add a shebang line like `#!/bin/bash`.",
    ]),
    "css": ("stackoverflow", [
        "How do I center the div .{x} horizontally and vertically with CSS?",
        "Why does my CSS class .{x} not override the style of .{y}?",
    ], [
        "Make the parent `display: flex; justify-content: center; align-items: center;` and .{x} is centered.",
        "The selector for .{y} is more specific than .{x}. Raise the specificity of .{x} or reorder the rules.",
    ]),
    "java": ("stackoverflow", [
        "How do I convert the String {x} to an int in Java?",
        "Why does my Java HashMap {x} return null for key {y}?",
    ], [
        "Use `Integer.parseInt({x})`. It throws NumberFormatException when {x} is not a number.",
        "The key {y} is not in {x}, or its class does not override equals and hashCode. Override both.",
    ]),
    "docker": ("devops", [
        "How do I remove all stopped Docker containers on host {x}?",
        "My Docker image {x} is too large. How can I make it smaller?",
    ], [
        "Run `docker container prune` on {x}. It deletes every stopped container after a prompt.",
        "Use a multi-stage build for {x} and a slim base image; copy only the built files into the last stage.",
    ]),
    "javascript": ("stackoverflow", [
        "How do I check if the JavaScript array {x} contains the value {y}?",
        "Why is `this` undefined inside my JavaScript callback {x}?",
    ], [
        "Use `{x}.includes({y})`. It returns true when the array contains {y}.",
        "A plain function callback gets its own `this`. Use an arrow function for {x} or call `.bind(this)`.",
    ]),
    "regex": ("stackoverflow", [
        "What regex matches a {n} digit number in the string {x}?",
        "How do I make my regex {x} non-greedy?",
    ], [
        "Use `\\b\\d{{{n}}}\\b`. The word boundaries stop it from matching inside longer numbers in {x}.",
        "Add `?` after the quantifier in {x}: `.*?` matches as little as possible.",
    ]),
    "excel": ("superuser", [
        "How do I sum column {x} in Excel only where column {y} says yes?",
        "How can I remove duplicate rows from sheet {x} in Excel?",
    ], [
        "Use `=SUMIF({y}:{y}, \"yes\", {x}:{x})`. It adds the cells of {x} whose row in {y} is yes.",
        "Select the data on {x} and use Data > Remove Duplicates. Choose the columns that define a duplicate.",
    ]),
    "math": ("math", [
        "What is the derivative of x^{n} times sin(x)?",
        "How do I prove that the sum of the first {n} odd numbers is {n} squared?",
    ], [
        "Use the product rule: {n}x^({n}-1) sin(x) + x^{n} cos(x).",
        "Use induction: the k-th odd number is 2k-1, and adding 2k+1 to k squared gives (k+1) squared.",
    ]),
    "networking": ("serverfault", [
        "How do I check if port {n} is open on the server {x}?",
        "Why can host {x} ping {y} by IP but not by name?",
    ], [
        "Run `nc -zv {x} {n}`. It reports whether a TCP connection to port {n} succeeds.",
        "Name resolution is broken on {x}. Check /etc/resolv.conf and test with `dig {y}`.",
    ]),
}

LOW_EFFORT = [
    "Just google it.", "Works for me.", "Why would you want to do that?", "Read the manual.",
    "I have the same problem. Any update?", "No idea, sorry.", "Try restarting your computer.",
    "This question is a duplicate.",
]

NAMES = ["alpha", "beta", "data", "main", "users", "orders", "config", "report", "build", "cache", "server",
         "items", "logs", "prod", "dev", "results", "temp", "backup", "worker", "index"]
OPENERS = ["", "I tried a few things but nothing works. ", "I am new to this. ", "This is probably simple. "]
CLOSERS = ["", " Thanks in advance!", " Any help is appreciated.", " What am I missing?"]


def _fill(template: str, x: str, y: str, n: int) -> str:
    return template.format(x=x, y=y, n=n)


def _row(rng: random.Random, i: int) -> dict:
    topics = list(TOPICS)
    topic = rng.choice(topics)
    site, questions, answers = TOPICS[topic]
    k = rng.randrange(len(questions))
    x, y = rng.sample(NAMES, 2)
    n = rng.randint(2, 9)
    question = rng.choice(OPENERS) + _fill(questions[k], x, y, n) + rng.choice(CLOSERS)
    chosen = _fill(answers[k % len(answers)], x, y, n)
    if rng.random() < 0.3:
        chosen += " " + rng.choice(["Hope this helps.", "This is documented in the official docs.", "It works for me on the latest version."])
    kind = rng.random()
    if kind < 0.4:  # a fluent answer, but to another topic's question
        other = rng.choice([t for t in topics if t != topic])
        o_answers = TOPICS[other][2]
        rejected = _fill(rng.choice(o_answers), *rng.sample(NAMES, 2), rng.randint(2, 9))
    elif kind < 0.7:
        rejected = rng.choice(LOW_EFFORT)
    else:  # a good answer scrambled into word salad
        words = chosen.split()
        rng.shuffle(words)
        rejected = " ".join(words)
    if rejected == chosen:
        rejected = rng.choice(LOW_EFFORT)
    return {
        "qid": i,
        "question": question,
        "response_j": chosen,
        "response_k": rejected,
        "date": f"20{rng.randint(10, 23):02d}/{rng.randint(1, 12):02d}/{rng.randint(1, 28):02d}",
        "metadata": [f"https://{site}.stackexchange.com/questions/{100000 + i}"],
    }


def generate_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` rows, identical for the same ``seed``."""
    if n < 0:
        raise ValueError("n must be >= 0")
    rng = random.Random(seed)
    return [_row(rng, i) for i in range(n)]


def sample_texts(n: int = 2000, seed: int = 0) -> Iterator[str]:
    """Questions and answers, for training the tiny model's tokenizer."""
    for row in generate_rows(n, seed):
        yield row["question"]
        yield row["response_j"]
        yield row["response_k"]
    for topic, (_, qs, ans) in TOPICS.items():
        yield topic + " " + " ".join(qs + ans)
    yield from LOW_EFFORT
