"""A generated preference dataset in the ``lvwerra/stack-exchange-paired`` schema (`generate_rows`),
or the same pairs in another data format (`sample_rows`: TRL's standard, conversational or
implicit-prompt rows).

Deterministic from a seed, any size, no network. The preference signal is learnable by a tiny
model: the chosen answer (``response_j``) is on the question's topic, names its tools and the
names used in the question, is made of well-formed sentences and sometimes carries a short
code block; the rejected answer (``response_k``) is measurably worse, one of (shares in `REJECT_KINDS`)

* ``low_effort`` (30%) — "Just google it.", "Works for me." and the like;
* ``rambling``   (30%) — vague filler sentences that never name a tool;
* ``garbled``    (30%) — the good answer with its words shuffled (the code block dropped);
* ``off_topic``  (10%) — a fluent answer, but to another topic's question (other names, tools).

Measured: LoRA (r=16, every linear layer) + DPO on the tiny 2-layer Llama straight from its
random init, 100 steps of 16 pairs, lr 5e-3, beta 0.1, reaches eval reward accuracy ~0.92-0.94:
the first three kinds are learned completely, while ``off_topic`` — which needs the answer to be
conditioned on the question — stays near chance that early. It is kept small on purpose: it is
the part of the signal a bigger model or a longer run can still improve on.

Templates use ``{x}``/``{y}`` (names), ``{n}`` (a small number) and ``{v}`` (a version); they
are filled with ``str.replace``, so code in templates needs no brace escaping.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

# Bump when the generated text changes: the tiny model's tokenizer is trained on it, so its
# cache key (`raydpo.models.tiny`) includes this.
SAMPLE_VERSION = 2

# topic -> site, language of its code blocks, and (question, answer, code or None) items
TOPICS: dict[str, dict] = {
    "git": {"site": "stackoverflow", "lang": "bash", "items": [
        ("How do I undo the last git commit on branch {x} without losing the changes in my working tree?",
         "Use git reset with the soft flag on {x}: the commit is removed from the branch history but your changes stay staged, so you can commit them again.",
         "git checkout {x}\ngit reset --soft HEAD~1"),
        ("git push to the remote branch {x} is rejected with a non-fast-forward error. How do I fix the push?",
         "The remote branch {x} has commits that your local branch does not have. Pull them with rebase first, then push again; never force push a shared branch.",
         "git pull --rebase origin {x}\ngit push origin {x}"),
        ("How can I rename the local git branch {x} to {y} and update the remote branch too?",
         "Rename the branch with git branch -m, push the new name {y} with upstream tracking, then delete the old remote branch {x}.",
         "git branch -m {x} {y}\ngit push origin -u {y}\ngit push origin --delete {x}"),
    ]},
    "python": {"site": "stackoverflow", "lang": "python", "items": [
        ("In Python, how do I read the file {x}.txt line by line into a list without the newline characters?",
         "Open {x}.txt in a with block and call read().splitlines(): it returns a Python list of lines without the trailing newlines, and the file is closed for you.",
         "with open('{x}.txt') as f:\n    lines = f.read().splitlines()"),
        ("Why does my Python dict {x} raise a KeyError for the key {y} when I access it?",
         "The key {y} is not in the dict {x}. Use {x}.get('{y}') to get None instead of a KeyError, or check with the in operator first.",
         "value = {x}.get('{y}', None)"),
        ("How do I sort a Python list of tuples called {x} by the second element of each tuple?",
         "Call sorted on {x} with a key function that returns the second element; pass reverse=True for descending order. The original list is not changed.",
         "{x}_sorted = sorted({x}, key=lambda t: t[1])"),
    ]},
    "sql": {"site": "dba", "lang": "sql", "items": [
        ("How do I select the top {n} rows per group from the SQL table {x}, ordered by score?",
         "Number the rows of {x} inside each group with the ROW_NUMBER window function ordered by score, then keep the rows whose number is at most {n}.",
         "SELECT * FROM (\n  SELECT *, ROW_NUMBER() OVER (PARTITION BY grp ORDER BY score DESC) AS rn FROM {x}\n) t WHERE rn <= {n};"),
        ("My SQL join between the tables {x} and {y} returns duplicate rows. Why does the join do that?",
         "The join key is not unique in table {y}, so every row of {x} matches several rows of {y}. Join on a unique key or aggregate {y} before the join.",
         None),
        ("How can I count the distinct values of the column {x} in a PostgreSQL table?",
         "Use COUNT with DISTINCT on the column {x}. PostgreSQL skips NULL values in the count, so add them separately if you need them.",
         "SELECT COUNT(DISTINCT {x}) FROM {y};"),
    ]},
    "linux": {"site": "unix", "lang": "bash", "items": [
        ("How do I find all files named {x} under the /var directory from a Linux shell?",
         "Use find with the name test on /var. Redirect stderr to /dev/null to hide the permission denied errors for directories you cannot read.",
         "find /var -name '{x}' 2>/dev/null"),
        ("How can I see which Linux process is listening on TCP port {n}0{n}?",
         "Run ss with the listening, tcp, numeric and process flags as root and grep for port {n}0{n}; the output shows the process name and its pid.",
         "sudo ss -ltnp | grep ':{n}0{n}'"),
        ("How do I make the shell script {x}.sh executable and run it from bash?",
         "Add the execute permission with chmod, then start the script with a relative path. Put a shebang line like #!/bin/bash at the top of {x}.sh.",
         "chmod +x {x}.sh\n./{x}.sh"),
    ]},
    "css": {"site": "stackoverflow", "lang": "css", "items": [
        ("How do I center the div .{x} horizontally and vertically inside its parent with CSS?",
         "Make the parent of .{x} a flex container and center it on both axes with justify-content and align-items. This works in every current browser.",
         ".parent {\n  display: flex;\n  justify-content: center;\n  align-items: center;\n}"),
        ("Why does my CSS class .{x} not override the style of the class .{y} on the same element?",
         "The selector for .{y} is more specific than .{x}, or it comes later in the stylesheet. Raise the specificity of .{x} or move its rule after .{y}.",
         None),
        ("How can I make the CSS grid .{x} show {n} equal columns?",
         "Use grid-template-columns with repeat and the fr unit on .{x}: each of the {n} columns takes an equal share of the free space.",
         ".{x} {\n  display: grid;\n  grid-template-columns: repeat({n}, 1fr);\n}"),
    ]},
    "java": {"site": "stackoverflow", "lang": "java", "items": [
        ("How do I convert the Java String {x} to an int, and what happens if it is not a number?",
         "Use Integer.parseInt on {x}. It throws a NumberFormatException when {x} is not a valid integer, so catch that exception if the input comes from a user.",
         "int value = Integer.parseInt({x});"),
        ("Why does my Java HashMap {x} return null for the key {y} that I just put in?",
         "Either {y} is not in the HashMap {x}, or the key class does not override equals and hashCode consistently. Override both methods in the key class.",
         None),
        ("How do I iterate over a Java List {x} and remove elements without a ConcurrentModificationException?",
         "Use an Iterator over {x} and call its remove method, or call removeIf on the list with a predicate. Removing from the list inside a for each loop throws.",
         "{x}.removeIf(item -> item.isEmpty());"),
    ]},
    "javascript": {"site": "stackoverflow", "lang": "javascript", "items": [
        ("How do I check if the JavaScript array {x} contains the value {y}?",
         "Use the includes method of the array {x}: it returns true when {y} is an element. For arrays of objects use some with a predicate instead.",
         "const found = {x}.includes({y});"),
        ("Why is this undefined inside my JavaScript callback function {x}?",
         "A plain function callback gets its own this binding. Write {x} as an arrow function, which keeps the outer this, or call bind(this) on it.",
         "button.addEventListener('click', () => this.{x}());"),
        ("How do I wait for several JavaScript promises {x} and {y} at the same time?",
         "Pass both promises to Promise.all and await the result: you get an array with the value of {x} and the value of {y}, and it rejects if either fails.",
         "const [a, b] = await Promise.all([{x}, {y}]);"),
    ]},
    "docker": {"site": "devops", "lang": "bash", "items": [
        ("How do I remove all stopped Docker containers on the host {x}?",
         "Run docker container prune on {x}. It deletes every stopped container after asking for confirmation; add -f to skip the prompt in scripts.",
         "docker container prune -f"),
        ("My Docker image {x} is over {n} GB. How can I make the image smaller?",
         "Use a multi-stage build for {x} with a slim base image and copy only the built files into the last stage. Also clean the package cache in the same RUN layer.",
         None),
        ("How do I pass the environment variable {x} into a Docker container at run time?",
         "Use the -e flag of docker run to set {x}, or an env file with --env-file for many variables. The value is visible inside the container process.",
         "docker run -e {x}=value {y}:latest"),
    ]},
    "regex": {"site": "stackoverflow", "lang": "text", "items": [
        ("What regex matches a number with exactly {n} digits inside the string {x}?",
         "Use a digit class with a {n} repetition count between word boundaries. The boundaries stop the regex from matching inside longer numbers in {x}.",
         "\\b\\d{{n}}\\b"),
        ("How do I make my regex {x} non-greedy so it stops at the first match?",
         "Add a question mark after the quantifier in {x}: .*? matches as few characters as possible, so the regex stops at the first closing delimiter.",
         None),
        ("How can I capture the year from dates like {n}/{n}/20{n}{n} with a regex?",
         "Put the four year digits in a capture group at the end of the pattern; group one of the match is then the year.",
         "\\d{1,2}/\\d{1,2}/(\\d{4})"),
    ]},
    "excel": {"site": "superuser", "lang": "text", "items": [
        ("How do I sum column {x} in Excel only on the rows where column {y} says yes?",
         "Use the SUMIF function: the range to test is column {y}, the criterion is yes, and the range to add is column {x}.",
         "=SUMIF({y}:{y}, \"yes\", {x}:{x})"),
        ("How can I remove duplicate rows from the Excel sheet {x}?",
         "Select the data on sheet {x} and use Data, Remove Duplicates. Choose the columns that define a duplicate row; Excel keeps the first occurrence.",
         None),
        ("How do I look up the value in column {n} of the Excel table {x} for a given id?",
         "Use XLOOKUP with the id column of {x} as the lookup array and column {n} as the return array; in older Excel use VLOOKUP with FALSE for an exact match.",
         "=XLOOKUP(A2, {x}[id], {x}[col{n}])"),
    ]},
    "networking": {"site": "serverfault", "lang": "bash", "items": [
        ("How do I check if TCP port {n}0{n} is open on the server {x} from another machine?",
         "Run nc in zero I/O mode with verbose output against {x} and port {n}0{n}. It reports whether a TCP connection succeeds.",
         "nc -zv {x} {n}0{n}"),
        ("Why can the host {x} ping {y} by IP address but not by its host name?",
         "Name resolution is broken on {x}. Check the nameserver lines in /etc/resolv.conf and test the DNS lookup of {y} with dig.",
         "dig {y} +short"),
        ("How do I see the route that packets take from {x} to {y}?",
         "Run traceroute from {x} to {y}; each line is one router hop with its round trip time. Use mtr for a live view.",
         "traceroute {y}"),
    ]},
    "cpp": {"site": "stackoverflow", "lang": "cpp", "items": [
        ("Why does my C++ program crash when I use the vector {x} after push_back in a loop?",
         "push_back can reallocate the vector {x}, which invalidates every iterator, pointer and reference into it. Use indices or reserve the capacity first.",
         "{x}.reserve({n}00);"),
        ("How do I convert an int {x} to a std::string in C++?",
         "Use std::to_string from the string header on {x}. For formatting options use std::format in C++20 or a std::ostringstream.",
         "std::string s = std::to_string({x});"),
        ("What is the difference between std::unique_ptr and std::shared_ptr for my object {x}?",
         "A std::unique_ptr has exactly one owner of {x} and cannot be copied, only moved. A std::shared_ptr counts its owners and frees {x} when the last one goes away.",
         "auto {x} = std::make_unique<Widget>();"),
    ]},
    "rust": {"site": "stackoverflow", "lang": "rust", "items": [
        ("Why does the Rust borrow checker complain that {x} is borrowed as mutable more than once?",
         "Rust allows one mutable borrow of {x} at a time. End the first borrow before the second one starts, for example by moving it into its own block.",
         None),
        ("How do I convert a Rust String {x} to a &str?",
         "Borrow the String {x} with &{x} or call {x}.as_str(); deref coercion turns a &String into a &str wherever a &str is expected.",
         "let s: &str = {x}.as_str();"),
        ("How do I read the file {x}.toml into a String in Rust?",
         "Use std::fs::read_to_string with the path {x}.toml and handle the io::Result, for example with the question mark operator in a function that returns Result.",
         "let text = std::fs::read_to_string(\"{x}.toml\")?;"),
    ]},
    "kubernetes": {"site": "devops", "lang": "bash", "items": [
        ("How do I see the logs of the crashed Kubernetes pod {x} in namespace {y}?",
         "Run kubectl logs with the previous flag for pod {x} in namespace {y}: it shows the logs of the container that crashed, not the restarted one.",
         "kubectl logs {x} -n {y} --previous"),
        ("How can I scale the Kubernetes deployment {x} to {n} replicas?",
         "Use kubectl scale on deployment {x} with replicas set to {n}, or change spec.replicas in the manifest and apply it again.",
         "kubectl scale deployment {x} --replicas={n}"),
        ("Why is my Kubernetes pod {x} stuck in the Pending state?",
         "The scheduler cannot place pod {x}: usually no node has enough CPU or memory for its requests. kubectl describe pod shows the scheduling events.",
         "kubectl describe pod {x}"),
    ]},
    "pandas": {"site": "datascience", "lang": "python", "items": [
        ("How do I drop the rows of the pandas DataFrame {x} where the column {y} is NaN?",
         "Call dropna on {x} with subset set to the column {y}. It returns a new DataFrame; assign it back or pass inplace=True.",
         "{x} = {x}.dropna(subset=['{y}'])"),
        ("How can I group the pandas DataFrame {x} by the column {y} and sum the other columns?",
         "Use groupby on {y} followed by sum. Pass numeric_only=True so pandas skips text columns, and reset_index if you want {y} back as a column.",
         "{x}.groupby('{y}').sum(numeric_only=True).reset_index()"),
        ("How do I read the CSV file {x}.csv with pandas when it uses a semicolon separator?",
         "Pass sep=';' to pandas read_csv for {x}.csv. If decimals use commas, also pass decimal=',' so the numbers are parsed as floats.",
         "df = pd.read_csv('{x}.csv', sep=';')"),
    ]},
    "react": {"site": "stackoverflow", "lang": "javascript", "items": [
        ("Why does my React component {x} render twice in development mode?",
         "React StrictMode renders {x} twice in development on purpose to find side effects in render. It does not happen in a production build.",
         None),
        ("How do I update the React state {x} based on its previous value?",
         "Pass a function to the setter of {x}: React calls it with the previous state, so several updates in a row do not lose each other.",
         "set{x}(prev => prev + {n});"),
        ("Why does my React useEffect in {x} run in an infinite loop?",
         "The effect in {x} sets state that is also in its dependency array, so every render triggers it again. Fix the dependency array or compare before setting state.",
         "useEffect(() => { load{y}(); }, []);"),
    ]},
    "android": {"site": "android", "lang": "java", "items": [
        ("How do I show a short Toast message from the Android activity {x}?",
         "Call Toast.makeText with the activity {x} as context, the text and LENGTH_SHORT, then call show. Call it on the main thread.",
         "Toast.makeText({x}.this, \"Saved\", Toast.LENGTH_SHORT).show();"),
        ("Why does my Android app {x} throw a NetworkOnMainThreadException?",
         "Android forbids network calls on the main thread. Move the request in {x} to a background thread, an executor or a coroutine.",
         None),
        ("How can I keep the state of the Android activity {x} when the screen rotates?",
         "Store the state of {x} in a ViewModel, which survives configuration changes, or save small values in onSaveInstanceState.",
         None),
    ]},
    "latex": {"site": "tex", "lang": "latex", "items": [
        ("How do I put the figure {x} exactly where it appears in my LaTeX source?",
         "Load the float package and use the H placement for figure {x}. LaTeX then does not float it to another page.",
         "\\usepackage{float}\n\\begin{figure}[H]"),
        ("How can I make a LaTeX table with {n} columns fit the page width?",
         "Use the tabularx package with the X column type for the {n} columns and textwidth as the table width; the columns share the space.",
         "\\begin{tabularx}{\\textwidth}{XXX}"),
        ("Why does my LaTeX reference to the label {x} show two question marks?",
         "LaTeX needs two runs to resolve the label {x}: compile the document again. If it stays, the label is placed before the caption.",
         None),
    ]},
    "vim": {"site": "vi", "lang": "text", "items": [
        ("How do I replace every occurrence of {x} with {y} in the whole file in Vim?",
         "Use the substitute command over the whole file with the g flag: every {x} on every line becomes {y}. Add c to confirm each change.",
         ":%s/{x}/{y}/g"),
        ("How can I delete {n} lines at once in Vim?",
         "In normal mode type the count {n} followed by dd: Vim deletes {n} lines starting at the cursor and puts them in the register.",
         "{n}dd"),
        ("How do I open the file {x}.txt in a vertical split in Vim?",
         "Use the vsplit command with the file name {x}.txt; switch between the windows with Ctrl-w followed by w.",
         ":vsplit {x}.txt"),
    ]},
    "math": {"site": "math", "lang": "text", "items": [
        ("What is the derivative of x^{n} times sin(x), and which rule do I use?",
         "Use the product rule: the derivative is {n}x^({n}-1) sin(x) + x^{n} cos(x). Differentiate one factor at a time and add the two terms.",
         None),
        ("How do I prove that the sum of the first {n} odd numbers is {n} squared?",
         "Use induction on the count. The k-th odd number is 2k-1, and adding the next odd number 2k+1 to k squared gives k+1 squared.",
         None),
        ("How do I compute the probability of getting at least one six in {n} rolls of a die?",
         "Use the complement: the probability of no six in {n} rolls is (5/6)^{n}, so the probability of at least one six is 1 - (5/6)^{n}.",
         None),
    ]},
}

OWN_DOMAINS = {"stackoverflow": "stackoverflow.com", "superuser": "superuser.com", "serverfault": "serverfault.com"}
NAMES = ["alpha", "beta", "data", "main", "users", "orders", "config", "report", "build", "cache", "server",
         "items", "logs", "prod", "dev", "results", "temp", "backup", "worker", "index", "payload", "session",
         "invoice", "staging", "metrics", "profile", "queue", "widget", "ledger", "tasks"]
VERSIONS = ["1.2", "2.0", "2.7", "3.1", "3.11", "4.4", "5.0", "10", "12.3", "22.04"]

OPENERS = ["", "", "I tried a few things but nothing works so far. ", "I am new to this, sorry if it is obvious. ",
           "This is probably simple but I am stuck. ", "I have been searching for an hour. "]
CONTEXTS = [" I am using version {v} on my laptop.", " This is for a small project called {y}.",
            " The docs were not clear to me on this point.", " It used to work with version {v}.",
            " I need this for a script at work."]
TRIED = ["", "", " I tried the first answer on a similar question but it did not help.",
         " I read a few blog posts about {x} but they all seem outdated.",
         " My colleague suggested rewriting everything, which seems too much."]
CLOSERS = ["", " Thanks in advance!", " Any help is appreciated.", " What am I missing?", " Is there a cleaner way?"]
LEADS = ["", "", "Short answer: ", "You can do this directly. ", "This is a common problem. "]
TAILS = ["", "", "", " This works with version {v} and later.", " The official documentation describes it in detail.",
         " I use this in production and it is reliable."]

LOW_EFFORT = [
    "Just google it.", "Works for me.", "Why would you want to do that?", "Read the manual.",
    "I have the same problem. Any update?", "No idea, sorry.", "Try restarting your computer.",
    "This question is a duplicate.", "Did you try turning it off and on again?", "Same here, following.",
    "Use a different tool.", "It depends.", "That is not how you should do it.", "lol",
]
RAMBLE = [
    "Well, I am not really sure about this one.", "I had something similar a while ago, or maybe it was different.",
    "It kind of depends on a lot of things, honestly.", "Sometimes it just works and sometimes it does not.",
    "My friend told me something about it once but I forgot the details.", "You could maybe try some other things.",
    "I think there is a setting somewhere, but I do not remember where.", "Anyway, good luck with that.",
    "In my experience these things are always complicated.", "Maybe it is a bug, who knows.",
    "I would not worry about it too much.", "There are many opinions about this on the internet.",
]

REJECT_KINDS = (("off_topic", 0.1), ("low_effort", 0.3), ("rambling", 0.3), ("garbled", 0.3))


def _fill(template: str, x: str, y: str, n: int, v: str) -> str:
    return template.replace("{x}", x).replace("{y}", y).replace("{n}", str(n)).replace("{v}", v)


def _slots(rng: random.Random) -> tuple[str, str, int, str]:
    x, y = rng.sample(NAMES, 2)
    return x, y, rng.randint(2, 9), rng.choice(VERSIONS)


def _answer(rng: random.Random, topic: str, item: tuple, slots: tuple) -> str:
    _, answer, code = item
    text = rng.choice(LEADS) + _fill(answer, *slots)
    tail = _fill(rng.choice(TAILS), *slots)
    if code is not None and rng.random() < 0.5:
        text += f"\n\n```{TOPICS[topic]['lang']}\n{_fill(code, *slots)}\n```"
        tail = "\n\n" + tail.strip() if tail else ""
    return text + tail


def _rejected(rng: random.Random, topic: str, chosen: str) -> str:
    r, kind = rng.random(), REJECT_KINDS[-1][0]
    for name, p in REJECT_KINDS:
        if r < p:
            kind = name
            break
        r -= p
    if kind == "off_topic":
        other = rng.choice([t for t in TOPICS if t != topic])
        return _answer(rng, other, rng.choice(TOPICS[other]["items"]), _slots(rng))
    if kind == "low_effort":
        return rng.choice(LOW_EFFORT)
    if kind == "rambling":
        return " ".join(rng.sample(RAMBLE, rng.randint(2, 4)))
    words = chosen.split("```")[0].split()
    rng.shuffle(words)
    return " ".join(words)


def _row(rng: random.Random, i: int) -> dict:
    topic = rng.choice(list(TOPICS))
    t = TOPICS[topic]
    item = rng.choice(t["items"])
    slots = _slots(rng)
    question = (rng.choice(OPENERS) + _fill(item[0], *slots) + _fill(rng.choice(CONTEXTS), *slots)
                + _fill(rng.choice(TRIED), *slots) + rng.choice(CLOSERS))
    chosen = _answer(rng, topic, item, slots)
    rejected = _rejected(rng, topic, chosen)
    if rejected.strip() == chosen.strip():  # a one-word answer shuffled into itself
        rejected = rng.choice(LOW_EFFORT)
    host = OWN_DOMAINS.get(t["site"], f"{t['site']}.stackexchange.com")
    user = rng.randint(1, 99999)
    return {
        "qid": i,
        "question": question,
        "response_j": chosen,
        "response_k": rejected,
        "date": f"20{rng.randint(10, 23):02d}/{rng.randint(1, 12):02d}/{rng.randint(1, 28):02d}",
        "metadata": [f"https://{host}/questions/{1000 + i}", f"https://{host}", f"https://{host}/users/{user}/"],
    }


def generate_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` rows in the stack-exchange-paired schema, identical for the same ``seed``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    return [_row(rng, i) for i in range(n)]


def sample_rows(n: int, seed: int = 0, fmt: str = "stack_exchange",
                template: str = "Question: {question}\n\nAnswer: ") -> list[dict]:
    """The pairs of ``generate_rows(n, seed)`` in data format ``fmt`` (`raydpo.data.formats`):
    ``stack_exchange`` (those very rows), ``standard`` (the question formatted with ``template``
    as the prompt), ``conversational`` (one user turn, one assistant turn each), or
    ``implicit_prompt`` (the two whole conversations)."""
    rows = generate_rows(n, seed)
    if fmt == "stack_exchange":
        return rows
    out = []
    for r in rows:
        q, j, k = r["question"], r["response_j"], r["response_k"]
        user = {"role": "user", "content": q}
        if fmt == "standard":
            out.append({"qid": r["qid"], "prompt": template.format(question=q), "chosen": j, "rejected": k})
        elif fmt == "conversational":
            out.append({"qid": r["qid"], "prompt": [user], "chosen": [{"role": "assistant", "content": j}],
                        "rejected": [{"role": "assistant", "content": k}]})
        elif fmt == "implicit_prompt":
            out.append({"qid": r["qid"], "chosen": [user, {"role": "assistant", "content": j}],
                        "rejected": [user, {"role": "assistant", "content": k}]})
        else:
            raise ValueError(f"unknown data format {fmt!r}")
    return out


def sample_texts(n: int = 2000, seed: int = 0) -> Iterator[str]:
    """Questions and answers of ``generate_rows(n, seed)``, then every template once, for
    training the tiny model's tokenizer."""
    for row in generate_rows(n, seed):
        yield row["question"]
        yield row["response_j"]
        yield row["response_k"]
    for t in TOPICS.values():
        for q, a, code in t["items"]:
            yield q
            yield a
            if code:
                yield code
    yield from LOW_EFFORT
    yield from RAMBLE
