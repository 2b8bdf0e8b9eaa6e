"""Every string the benchmark generators can emit: words, sentences and prompt templates.

The generators in `benchmarks/suite/tasks.py` build all their text from these constants plus digits,
hex digits (UUIDs), upper-case letters (variable names) and punctuation, so a word-level
tokenizer built over this module (`benchmarks/probe/tokenizer.py`) covers every prompt.

Changing anything here changes the probe tokenizer's vocabulary: the shipped probe model must
then be retrained (tests/test_probe.py checks it).
"""

from __future__ import annotations

# RULER's / InfiniteBench's repeated noise haystack.
NOISE_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)

ADJECTIVES = (
    "able", "acid", "agile", "alert", "ample", "angry", "awake", "bad", "bald", "bare", "basic",
    "big", "bitter", "black", "bland", "blank", "bold", "brave", "brief", "bright", "brisk",
    "broad", "brown", "busy", "calm", "cheap", "chief", "clean", "clear", "clever", "close",
    "cold", "cool", "crisp", "cruel", "curly", "cute", "damp", "dark", "dear", "deep", "dense",
    "dizzy", "dry", "dull", "dusty", "eager", "early", "easy", "empty", "equal", "even", "exact",
    "fair", "faint", "false", "fancy", "fast", "fat", "fierce", "fine", "firm", "flat", "fluffy",
    "fond", "foolish", "free", "fresh", "frozen", "full", "funny", "gentle", "giant", "glad",
    "golden", "good", "grand", "gray", "great", "green", "grumpy", "happy", "hard", "harsh",
    "heavy", "high", "hollow", "honest", "hot", "huge", "humble", "hungry", "icy", "idle",
    "jolly", "keen", "kind", "large", "late", "lazy", "light", "little", "lively", "lonely",
    "long", "loose", "loud", "lovely", "low", "loyal", "lucky", "mad", "major", "mellow",
    "merry", "mighty", "mild", "minor", "modern", "moist", "narrow", "neat", "nervous", "new",
    "nice", "noble", "noisy", "odd", "old", "open", "orange", "pale", "plain", "plump", "polite",
    "poor", "proud", "purple", "quick", "quiet", "rapid", "rare", "raw", "ready", "red", "rich",
    "rigid", "ripe", "rough", "round", "royal", "rude", "rusty", "sad", "safe", "salty", "sharp",
    "shiny", "short", "shy", "silent", "silly", "slim", "slow", "small", "smart", "smooth",
    "soft", "solid", "sour", "spicy", "stale", "steep", "stiff", "still", "strange", "strong",
    "sturdy", "sweet", "swift", "tall", "tame", "tender", "thick", "thin", "tidy", "tight",
    "tiny", "tough", "true", "ugly", "upset", "vast", "vivid", "warm", "weak", "wet", "white",
    "wide", "wild", "wise", "witty", "young", "zany",
)

NOUNS = (
    "acorn", "actor", "anchor", "angle", "apple", "apron", "arrow", "artist", "attic", "bag",
    "baker", "ball", "banana", "band", "bank", "barn", "basket", "bat", "beach", "bean", "bear",
    "bed", "bee", "bell", "bench", "berry", "bike", "bird", "blade", "blanket", "boat", "bone",
    "book", "boot", "bottle", "bowl", "box", "branch", "bread", "brick", "bridge", "brook",
    "brush", "bubble", "bucket", "bugle", "bus", "butter", "button", "cabin", "cable", "cake",
    "camel", "camera", "camp", "candle", "canoe", "canyon", "cap", "car", "card", "carpet",
    "carrot", "castle", "cat", "cave", "chair", "chalk", "cherry", "chest", "child", "circle",
    "city", "clock", "cloud", "coast", "coat", "coin", "comet", "cookie", "copper", "corn",
    "cotton", "cow", "crab", "crane", "crayon", "creek", "crown", "cup", "curtain", "cushion",
    "daisy", "desert", "desk", "diamond", "dog", "doll", "dolphin", "door", "dragon", "drum",
    "duck", "eagle", "engine", "falcon", "farm", "feather", "fence", "field", "finger", "fire",
    "fish", "flag", "flame", "flower", "flute", "forest", "fork", "fox", "frog", "fruit",
    "garden", "gate", "ghost", "gift", "giraffe", "glass", "glove", "goat", "grape", "guitar",
    "hammer", "harbor", "hat", "hawk", "helmet", "hill", "honey", "horse", "house", "island",
    "jacket", "jar", "jelly", "jewel", "kettle", "key", "kitten", "kite", "ladder", "lake",
    "lamp", "lantern", "leaf", "lemon", "letter", "lion", "lizard", "lock", "magnet", "map",
    "marble", "meadow", "melon", "mirror", "monkey", "moon", "mountain", "mouse", "mug",
    "needle", "nest", "net", "ocean", "onion", "orchard", "otter", "owl", "paddle", "paint",
    "palace", "panda", "paper", "parrot", "peach", "pearl", "pebble", "pencil", "penguin",
    "pepper", "piano", "pigeon", "pillow", "pine", "pipe", "planet", "plate", "pocket", "pond",
    "potato", "puppet", "puzzle", "rabbit", "raft", "rain", "raven", "ribbon", "ring", "river",
    "road", "robin", "rock", "rocket", "rope", "rose", "saddle", "sail", "salmon", "sand",
    "scarf", "school", "shell", "ship", "shoe", "shovel", "silver", "snail", "snake", "sock",
    "spider", "spoon", "squirrel", "star", "stone", "storm", "stove", "straw", "stream",
    "street", "sugar", "swan", "sword", "table", "teapot", "tent", "thread", "tiger", "toast",
    "tomato", "tower", "towel", "tractor", "train", "tree", "trumpet", "tulip", "tunnel",
    "turtle", "umbrella", "valley", "vase", "violin", "wagon", "wall", "walnut", "watch",
    "water", "whale", "wheel", "whistle", "window", "wolf", "wool", "yacht", "zebra",
)

VERBS = (
    "admires", "builds", "carries", "catches", "chases", "cleans", "climbs", "colors", "counts",
    "covers", "crosses", "draws", "drops", "finds", "fixes", "follows", "gathers", "guards",
    "hides", "holds", "hunts", "joins", "keeps", "kicks", "lifts", "likes", "meets", "moves",
    "opens", "paints", "passes", "pulls", "pushes", "reaches", "sees", "sells", "shakes",
    "shares", "signs", "sorts", "spots", "studies", "swaps", "takes", "tosses", "touches",
    "trades", "visits", "washes", "watches", "wraps",
)

PREPOSITIONS = ("near", "under", "behind", "beside", "above", "across", "inside", "around")

# Coded words of the frequent-words task (fwe): letters only, not English, fixed order.
_SYLLABLES_A = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_SYLLABLES_B = ("a", "e", "i", "o", "u")
_SYLLABLES_C = ("x", "q", "j", "w")
CODED_WORDS = tuple(
    a + b + c + b2
    for c in _SYLLABLES_C
    for a in _SYLLABLES_A
    for b, b2 in (("a", "o"), ("e", "u"), ("i", "a"), ("o", "e"), ("u", "i"))
)  # 4 * 14 * 5 = 280 words such as "baxo", "dewu"

TEMPLATES = {
    "niah": (
        "Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the {kind} afterwards."
    ),
    "niah_needle": "One of the special magic {kind} for {key} is: {value}.",
    "niah_question_one": "What is the special magic {kind_one} for {key} mentioned in the provided text?",
    "niah_answer_one": "The special magic {kind_one} for {key} mentioned in the provided text is",
    "niah_question_all": "What are all the special magic {kind} for {key} mentioned in the provided text?",
    "niah_answer_all": "The special magic {kind} for {key} mentioned in the provided text are",
    "niah_kinds": "numbers number uuids uuid",
    "vt": "Memorize and track the chain of variable assignment hidden in the following text.",
    "vt_line": "VAR {name} = {value}",
    "vt_question": "Question: Find all variables that are assigned the value {value} in the text above.",
    "vt_answer": (
        "Answer: According to the chain of variable assignment in the text above, {count} variables "
        "are assigned the value {value}, they are:"
    ),
    "cwe": (
        "Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often."
    ),
    "cwe_question": "Question: What are the {count} most common words in the above list?",
    "cwe_answer": "Answer: The top {count} words that appear most often in the list are:",
    "fwe": (
        "Read the following coded text and track the frequency of each coded word. Find the three "
        "most frequently appeared coded words."
    ),
    "fwe_question": (
        "Question: Do not provide any explanation. What are the three most frequently appeared words "
        "in the above coded text?"
    ),
    "fwe_answer": "Answer: According to the coded text above, the three most frequently appeared words are:",
    "passkey": (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there."
    ),
    "passkey_needle": "The pass key is {value}. Remember it. {value} is the pass key.",
    "passkey_question": "What is the pass key?",
    "passkey_answer": "The pass key is",
    "number_string": (
        "There is an important info hidden inside a lot of irrelevant text. Find it. I will quiz you "
        "about the important information there."
    ),
    "number_string_needle": "The sequence of digits is {value}. Remember it. {value} is the sequence of digits.",
    "number_string_question": "What is the sequence of digits?",
    "number_string_answer": "The sequence of digits is",
    "kv_retrieval": "Extract the value corresponding to the specified key in the JSON object below. JSON data:",
    "kv_retrieval_question": 'Key: "{key}"',
    "kv_retrieval_answer": "The value associated with the specified key is:",
    "essay": "The {adj} {noun} {verb} the {adj2} {noun2} {prep} the {noun3}.",
}
