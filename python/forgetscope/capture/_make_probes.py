"""Generator of the built-in probe set ``probes/default.jsonl`` (run as a script to rewrite it).

Every text is original: hand-written fragments combined by a seeded generator, so the set is free
of licence questions and byte-for-byte reproducible (a test regenerates it and compares). Four
kinds, interleaved so that any prefix of the file (``--probe-texts N``) stays varied:

* ``prose``: short descriptive and narrative paragraphs;
* ``code``: Python, Rust, JavaScript, SQL and shell snippets;
* ``math``: arithmetic, algebra and word problems with worked answers;
* ``dialogue``: multi-turn exchanges between a user and an assistant or two people.

Usage: ``python -m forgetscope.capture._make_probes [OUT]``.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Callable, Dict, List

SEED = 20260201
N_PER_KIND = 75

# ------------------------------------------------------------------------------------------------
# prose

_SUBJECTS = [
    "The old lighthouse keeper", "A young botanist", "The night train to the coast", "Our neighbour's cat",
    "The village baker", "A retired sea captain", "The river after the storm", "The small museum on the hill",
    "A tired cyclist", "The orchestra's second violinist", "The glacier above the valley", "A curious child",
    "The librarian", "An apprentice carpenter", "The morning market", "A field of sunflowers",
    "The abandoned observatory", "A flock of starlings", "The ferry captain", "The winter garden",
]
_VERBS = [
    "noticed that", "remembered how", "wondered whether", "explained why", "pretended that",
    "discovered that", "wrote down that", "could not forget that", "quietly decided that", "argued that",
]
_CLAUSES = [
    "the tide had come in earlier than the almanac promised",
    "every clock in the house ran four minutes slow",
    "the bread tasted better on rainy days",
    "the map in the hallway showed a road that no longer existed",
    "the bees preferred the blue flowers to the yellow ones",
    "a letter had been waiting in the drawer for eleven years",
    "the bridge hummed softly whenever the wind blew from the north",
    "the recipe needed twice as much salt as anyone admitted",
    "the stars looked closer from the roof of the barn",
    "the last bus never left before the driver finished his tea",
    "the paint on the fence changed colour with the seasons",
    "the quietest student asked the best questions",
    "the orchard produced more apples in the years nobody pruned it",
    "the harbour lights were arranged like a constellation",
    "the piano in the school hall was tuned a quarter tone flat",
]
_FOLLOWUPS = [
    "Nobody else seemed to care, but it changed the way the afternoons felt.",
    "It was the kind of detail that only matters to people who stay somewhere long enough.",
    "Later that week, the evidence was impossible to ignore.",
    "The explanation, when it finally came, was simpler than expected.",
    "Some things are easier to notice than to explain.",
    "By autumn the whole street was talking about it.",
    "There was no record of it anywhere, which made it more interesting.",
    "It turned out to be true, at least most of the time.",
]
_ESSAY = [
    "Good documentation explains not only what a tool does but why it was built that way. Readers who understand the reasons can adapt when the situation changes.",
    "Cities grow in layers. Streets laid out for horses now carry buses, and the old market squares become car parks before turning back into places for people.",
    "A well-designed experiment changes one thing at a time. When several factors move together, the result may be real but its cause remains a guess.",
    "Bread dough needs time more than effort. Yeast works slowly, and the flavour of a loaf depends on how long it was allowed to rise in a cool room.",
    "Migratory birds navigate using the sun, the stars and the magnetic field of the earth. Young birds seem to inherit the direction but learn the landmarks.",
    "Learning a language as an adult is less about memorising words than about tolerating confusion for long enough that patterns begin to appear.",
    "The first maps were drawn to be useful rather than accurate. A pilgrim needed to know which town came next, not the exact distance between them.",
    "Electric trains recover energy when they brake, feeding it back into the line so that another train, somewhere else, can use it to accelerate.",
    "Forests recover from fire in stages: grasses first, then shrubs, then fast-growing trees that shade the ground for the slower ones beneath them.",
    "A good meeting has a question it is trying to answer. Without one, the discussion drifts until the clock, rather than the argument, ends it.",
    "The tide is driven mostly by the moon, but the shape of a coastline decides how high the water rises. Narrow bays can double the range.",
    "Careful writers read their work aloud. The ear catches repeated words and tangled sentences that the eye slides over without complaint.",
    "Glass is made from sand, soda and lime heated until they melt together. Its colour comes from small amounts of metal left in the mixture.",
    "The history of timekeeping is a history of trade. Railways needed shared clocks long before most people needed to know the exact minute.",
    "Compost works because many small organisms each do a little of the job. Turning the pile gives them air, and air keeps the process from souring.",
]


def _prose(rng: random.Random, i: int) -> str:
    if i % 3 == 0:
        a, b = rng.sample(_ESSAY, 2)
        return f"{a} {b}"
    s = rng.choice(_SUBJECTS)
    v = rng.choice(_VERBS)
    c = rng.choice(_CLAUSES)
    f = rng.choice(_FOLLOWUPS)
    c2 = rng.choice(_CLAUSES)
    return f"{s} {v} {c}. {f} Years later, people still said {c2}."


# ------------------------------------------------------------------------------------------------
# code

_NAMES = ["total", "count", "items", "values", "scores", "buffer", "result", "rows", "weights", "names"]
_FUNCS = ["normalize", "moving_average", "clamp", "dedupe", "chunked", "histogram", "running_max", "safe_div"]


def _py(rng: random.Random) -> str:
    f = rng.choice(_FUNCS)
    a, b = rng.sample(_NAMES, 2)
    k = rng.randint(2, 9)
    bodies = {
        "normalize": f"def normalize({a}):\n    s = sum({a})\n    if s == 0:\n        return [0.0 for _ in {a}]\n    return [x / s for x in {a}]\n",
        "moving_average": f"def moving_average({a}, window={k}):\n    out = []\n    for i in range(len({a}) - window + 1):\n        out.append(sum({a}[i:i + window]) / window)\n    return out\n",
        "clamp": f"def clamp(x, lo=-{k}, hi={k}):\n    \"\"\"Limit x to the closed interval [lo, hi].\"\"\"\n    return max(lo, min(hi, x))\n",
        "dedupe": f"def dedupe({a}):\n    seen = set()\n    {b} = []\n    for x in {a}:\n        if x not in seen:\n            seen.add(x)\n            {b}.append(x)\n    return {b}\n",
        "chunked": f"def chunked({a}, size={k}):\n    for start in range(0, len({a}), size):\n        yield {a}[start:start + size]\n",
        "histogram": f"from collections import Counter\n\ndef histogram({a}):\n    {b} = Counter({a})\n    return sorted({b}.items(), key=lambda kv: -kv[1])[:{k}]\n",
        "running_max": f"def running_max({a}):\n    best = float('-inf')\n    for x in {a}:\n        best = max(best, x)\n        yield best\n",
        "safe_div": f"def safe_div(a, b, default={k}.0):\n    try:\n        return a / b\n    except ZeroDivisionError:\n        return default\n",
    }
    return bodies[f] + f"\nprint({f}([{', '.join(str(rng.randint(0, 20)) for _ in range(k))}]))"


def _rust(rng: random.Random) -> str:
    k = rng.randint(2, 12)
    choices = [
        f"fn sum_of_squares(xs: &[i64]) -> i64 {{\n    xs.iter().map(|x| x * x).sum()\n}}\n\nfn main() {{\n    let v: Vec<i64> = (1..={k}).collect();\n    println!(\"{{}}\", sum_of_squares(&v));\n}}",
        f"#[derive(Debug, Clone, PartialEq)]\nstruct Point {{\n    x: f64,\n    y: f64,\n}}\n\nimpl Point {{\n    fn norm(&self) -> f64 {{\n        (self.x * self.x + self.y * self.y).sqrt()\n    }}\n}}\n\nlet p = Point {{ x: {k}.0, y: {k + 1}.0 }};",
        f"fn first_word(s: &str) -> &str {{\n    s.split_whitespace().next().unwrap_or(\"\")\n}}\n\nassert_eq!(first_word(\"hello world\"), \"hello\");\nassert_eq!(first_word(\"\"), \"\");",
        f"use std::collections::HashMap;\n\nfn count_words(text: &str) -> HashMap<&str, usize> {{\n    let mut m = HashMap::new();\n    for w in text.split_whitespace() {{\n        *m.entry(w).or_insert(0) += 1;\n    }}\n    m\n}}",
    ]
    return rng.choice(choices)


def _js(rng: random.Random) -> str:
    k = rng.randint(2, 10)
    a = rng.choice(_NAMES)
    choices = [
        f"function debounce(fn, ms = {k * 50}) {{\n  let timer = null;\n  return (...args) => {{\n    clearTimeout(timer);\n    timer = setTimeout(() => fn(...args), ms);\n  }};\n}}",
        f"const {a} = [{', '.join(str(rng.randint(1, 50)) for _ in range(k))}];\nconst evens = {a}.filter((x) => x % 2 === 0);\nconsole.log(evens.reduce((s, x) => s + x, 0));",
        f"async function fetchJson(url) {{\n  const res = await fetch(url);\n  if (!res.ok) {{\n    throw new Error(`request failed: ${{res.status}}`);\n  }}\n  return res.json();\n}}",
        f"class Stack {{\n  constructor() {{ this.items = []; }}\n  push(x) {{ this.items.push(x); }}\n  pop() {{ return this.items.pop(); }}\n  get size() {{ return this.items.length; }}\n}}",
    ]
    return rng.choice(choices)


def _sql(rng: random.Random) -> str:
    k = rng.randint(3, 20)
    choices = [
        f"SELECT customer_id, COUNT(*) AS orders, SUM(amount) AS spent\nFROM orders\nWHERE created_at >= DATE '2024-01-01'\nGROUP BY customer_id\nHAVING COUNT(*) > {k}\nORDER BY spent DESC;",
        f"CREATE TABLE readings (\n  sensor_id INTEGER NOT NULL,\n  taken_at TIMESTAMP NOT NULL,\n  value REAL,\n  PRIMARY KEY (sensor_id, taken_at)\n);",
        f"UPDATE inventory\nSET quantity = quantity - {k}\nWHERE product_id = {k * 7} AND quantity >= {k};",
        f"SELECT d.name, AVG(e.salary) AS avg_salary\nFROM employees e\nJOIN departments d ON d.id = e.department_id\nGROUP BY d.name\nLIMIT {k};",
    ]
    return rng.choice(choices)


def _sh(rng: random.Random) -> str:
    k = rng.randint(2, 30)
    choices = [
        f"#!/bin/sh\nset -eu\nfor f in *.log; do\n  gzip -{min(k, 9)} \"$f\"\ndone\necho \"compressed $(ls *.gz | wc -l) files\"",
        f"find . -name '*.tmp' -mtime +{k} -print -delete",
        f"tar -czf backup-$(date +%F).tar.gz --exclude='*.cache' notes/ photos/\nls -lh backup-*.tar.gz | tail -n {k}",
    ]
    return rng.choice(choices)


def _code(rng: random.Random, i: int) -> str:
    return [_py, _rust, _js, _sql, _sh][i % 5](rng)


# ------------------------------------------------------------------------------------------------
# math

def _math(rng: random.Random, i: int) -> str:
    kind = i % 6
    if kind == 0:
        a, b = rng.randint(12, 999), rng.randint(12, 999)
        return f"Compute {a} + {b}. Adding the numbers gives {a} + {b} = {a + b}."
    if kind == 1:
        a, b = rng.randint(11, 99), rng.randint(11, 99)
        return (f"What is {a} times {b}? Split it: {a} x {b} = {a} x {b // 10 * 10} + {a} x {b % 10} "
                f"= {a * (b // 10 * 10)} + {a * (b % 10)} = {a * b}.")
    if kind == 2:
        x = rng.randint(-9, 12)
        m = rng.randint(2, 9)
        c = rng.randint(1, 30)
        return f"Solve {m}x + {c} = {m * x + c}. Subtract {c} from both sides: {m}x = {m * x}. Divide by {m}: x = {x}."
    if kind == 3:
        n = rng.randint(3, 9)
        price = rng.randint(2, 15)
        paid = n * price + rng.randint(1, 20)
        return (f"A shop sells notebooks for {price} euros each. Mia buys {n} notebooks and pays with {paid} euros. "
                f"The notebooks cost {n} x {price} = {n * price} euros, so her change is {paid} - {n * price} = {paid - n * price} euros.")
    if kind == 4:
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        from math import gcd
        g = gcd(a, b)
        return (f"The greatest common divisor of {a} and {b} is {g}, and their least common multiple is "
                f"{a * b // g}. Check: {g} x {a * b // g} = {a * b} = {a} x {b}.")
    n = rng.randint(3, 12)
    return (f"The sum of the first {n} odd numbers is {n * n}: "
            f"{' + '.join(str(2 * k + 1) for k in range(n))} = {n * n}. In general it equals n squared.")


# ------------------------------------------------------------------------------------------------
# dialogue

_TOPICS = [
    ("How do I keep basil alive indoors?", "Give it the sunniest window you have and water it when the top of the soil feels dry. Pinch off the flower buds so the plant keeps making leaves."),
    ("Why does my bread come out dense?", "Usually the dough did not rise long enough, or the kitchen was cold. Try a longer first rise in a warm spot and check that your yeast is fresh."),
    ("Can you explain what a hash map is?", "It stores values under keys. A hash function turns each key into an index, so looking something up takes about the same time no matter how many items there are."),
    ("What should I pack for a two-day hike?", "Water, layers for warmth, rain protection, a map, food that needs no cooking, a small first-aid kit and a headlamp. Tell someone your route."),
    ("Is it better to study in one long session or several short ones?", "Several short sessions spread over days usually work better. Spacing and testing yourself help memory more than rereading."),
    ("How do I write a polite reminder email?", "Keep it short, mention the original request and its date, and suggest a next step. A friendly opening and a clear question make replying easy."),
    ("What's the difference between weather and climate?", "Weather is what happens over hours or days. Climate is the pattern of weather over decades in a region."),
    ("My laptop is slow. What can I check first?", "Look at which programs use the most memory, restart it if it has been on for weeks, and make sure the disk is not almost full."),
    ("How long should I boil an egg?", "About seven minutes for a firm white and a soft centre, ten for fully hard. Cool it in cold water so it peels easily."),
    ("What is a good way to start running?", "Begin with short intervals of running and walking, three times a week, and add a little each week. Comfortable shoes matter more than speed."),
    ("How do I explain fractions to a child?", "Use something you can cut, like a pizza or a chocolate bar. Halves and quarters make sense when they can see and share the pieces."),
    ("What does a version control system do?", "It records every change to a set of files, who made it and why, so you can compare versions, undo mistakes and work on branches in parallel."),
    ("Why do leaves change colour in autumn?", "Trees stop making chlorophyll as days shorten. The green fades and the yellow and orange pigments that were there all along become visible."),
]
_PEOPLE = [("Ana", "Ben"), ("Chloe", "Dev"), ("Emil", "Farah"), ("Gus", "Hana"), ("Ivo", "Jun")]
_SMALLTALK = [
    ("Did you finish the report?", "Almost. I'm waiting for the last numbers from finance.", "Send it over when you can, I'll read it tonight."),
    ("Are we still meeting on Thursday?", "Yes, but can we move it to the afternoon?", "Three o'clock works for me."),
    ("The train is delayed again.", "How long this time?", "Twenty minutes, they say. I'll grab a coffee."),
    ("Have you tried the new bakery on the corner?", "Only the rye bread. It was excellent.", "Then I'm going there tomorrow morning."),
    ("I can't find my keys anywhere.", "Did you check the coat you wore yesterday?", "Found them. Thank you!"),
]


def _dialogue(rng: random.Random, i: int) -> str:
    if i % 2 == 0:
        q, a = rng.choice(_TOPICS)
        follow = rng.choice(["Thanks, that helps.", "Got it. Anything else I should know?", "Makes sense, I'll try that.",
                             "Could you say that more simply?"])
        return f"User: {q}\nAssistant: {a}\nUser: {follow}"
    (p1, p2), (l1, l2, l3) = rng.choice(_PEOPLE), rng.choice(_SMALLTALK)
    return f"{p1}: {l1}\n{p2}: {l2}\n{p1}: {l3}"


# ------------------------------------------------------------------------------------------------

_KINDS: Dict[str, Callable[[random.Random, int], str]] = {
    "prose": _prose, "code": _code, "math": _math, "dialogue": _dialogue,
}


def generate(n_per_kind: int = N_PER_KIND, seed: int = SEED) -> List[Dict[str, str]]:
    """The probe records ``{"text", "kind"}``, kinds interleaved, duplicates dropped."""
    rng = random.Random(seed)
    per: Dict[str, List[str]] = {}
    for kind, fn in _KINDS.items():
        seen: List[str] = []
        i = 0
        while len(seen) < n_per_kind and i < 50 * n_per_kind:
            t = fn(rng, i)
            i += 1
            if t not in seen:
                seen.append(t)
        per[kind] = seen
    out = []
    for j in range(max(len(v) for v in per.values())):
        for kind in _KINDS:
            if j < len(per[kind]):
                out.append({"text": per[kind][j], "kind": kind})
    return out


def render(records: List[Dict[str, str]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)


if __name__ == "__main__":  # pragma: no cover
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "probes" / "default.jsonl"
    out.write_text(render(generate()), encoding="utf-8")
    print(f"wrote {out}")
