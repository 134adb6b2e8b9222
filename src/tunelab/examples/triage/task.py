"""Support-ticket triage: a small classification task of our own making, sized for a CPU LoRA run on a ~135M model.

Each record is a short chat in the ``messages`` format: a system prompt naming the five labels, the
customer's first message, one clarifying question from the assistant, the customer's answer, and a
final assistant turn that is exactly one label word (``billing``, ``shipping``, ``technical``,
``account`` or ``returns``). Rendered examples are kept to roughly 60-120 tokens.

The label follows from what the problem *is*, not from the entities or the remedy asked for. Rules,
applied in this order (the first that fits wins):

1. ``account``: signing in fails because of the password, a reset or verification email/code, or a
   locked account; changing profile details; deleting the account; someone else using the account
   (even when the customer mentions the order or charge they made: "I don't recognise order A-...").
2. ``shipping``: an order that is on its way or should have arrived has not reached the customer: late,
   lost, tracking stuck, "delivered" but not received, or a delivery address to change. Still shipping when the customer asks for a refund or a
   resend ("it never arrived, I want my money back").
3. ``returns``: the customer has the item and wants to send it back or exchange it (wrong model,
   damaged on arrival, unwanted, or faulty when they choose to send it back), or asks where the refund
   for an item already sent back is.
4. ``technical``: a product or the app misbehaves and the customer wants it working (won't turn on,
   won't pair, crashes, failed update), including an app that freezes after the password is accepted.
5. ``billing``: money with no return and no missing parcel involved: double or unrecognised charges,
   a discount not applied, a shipping fee charged twice on a parcel that arrived, declined payments,
   invoices, a charge for an order cancelled before it shipped.

Harder cases built in: openers shared between labels, where only the customer's answer to the
clarifying question decides ("I want a refund for order A-..." -> shipping, returns or billing;
"my speaker is giving me trouble" -> technical or returns), and surface words that point the wrong way
("the reset email never arrives" is account; "I was charged shipping twice" and "my bank account shows
a payment" are billing; "I can't log in to the app, it freezes" is technical).

The test split's entities (first names, products, order numbers, cities, payment methods, carriers,
amounts) never occur in the training split: every entity pool is partitioned into disjoint train/test
parts, none a substring of another, so held-out accuracy measures triage, not memorised entities.
Classes are balanced (``n // 5`` per label, the remainder spread over distinct labels).

    python -m tunelab.examples.triage.task      # regenerate train.jsonl / test.jsonl beside this file
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tunelab.examples.splits import write_jsonl_splits

HERE = Path(__file__).parent

LABELS = ("billing", "shipping", "technical", "account", "returns")
SYSTEM_PROMPT = ("You triage customer support tickets. Ask one clarifying question, then answer with exactly one "
                 "label: billing, shipping, technical, account or returns.")

POOL_SEED = 7

# ------------------------------------------------------------------------------------ entity pools
# (train part, test part) per slot; no test value is a substring of any train value or vice versa
# (case-insensitive, across all pools), and none occurs in the templates below.

NAMES = (["Anna", "Ben", "Carla", "Diego", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kemal", "Lucia"],
         ["Marta", "Nils", "Olga", "Pavel", "Rania", "Sven"])
PRODUCTS = (["smart speaker", "wireless earbuds", "fitness tracker", "coffee maker", "robot vacuum", "baby monitor",
             "desk lamp", "security camera", "game controller", "tablet"],
            ["air purifier", "e-reader", "drone", "photo printer"])
CITIES = (["Leeds", "Lyon", "Porto", "Munich", "Krakow", "Dublin", "Turin", "Ghent"],
          ["Bergen", "Seville", "Tampere", "Brno"])
PAYMENTS = (["Visa card", "PayPal", "Apple Pay", "debit card", "credit card"],
            ["Mastercard", "Google Pay", "Klarna"])
CARRIERS = (["DHL", "UPS", "GLS", "Royal Mail"], ["FedEx", "DPD"])
AMOUNTS = ([f"${d}.99" for d in (12, 19, 24, 29, 34, 45, 58, 79)], [f"${d}.99" for d in (17, 36, 63, 88)])


def _order_numbers() -> tuple[list[str], list[str]]:
    """36 train and 12 test order numbers like ``A-12345`` (distinct, same length: none contains another)."""
    numbers = [f"A-{n}" for n in random.Random(POOL_SEED).sample(range(10000, 100000), 48)]
    return numbers[:36], numbers[36:]


def value_pools() -> dict[str, dict[str, list[str]]]:
    """Every slot's values, split into disjoint ``train`` and ``test`` parts."""
    pools = {"name": NAMES, "product": PRODUCTS, "order": _order_numbers(), "city": CITIES,
             "payment": PAYMENTS, "carrier": CARRIERS, "amount": AMOUNTS}
    return {slot: {"train": list(train), "test": list(test)} for slot, (train, test) in pools.items()}


def test_only_values() -> set[str]:
    """All entity values used only by the test split."""
    return {v for pool in value_pools().values() for v in pool["test"]}


# -------------------------------------------------------------------------------------- templates
# A scenario is (customer openers, [(clarifying question, customer answer), ...]): any opener goes with
# any pair. Slots are filled with str.format; every opener/pair combination names at least one entity.

REFUND_OPENERS = ["I want a refund for order {order}.", "Can I get my money back for order {order}?",
                  "Please refund order {order}, I paid {amount}."]
TROUBLE_OPENERS = ["My {product} from order {order} is giving me trouble.",
                   "I'm not happy with the {product} I bought, order {order}."]
TROUBLE_QUESTION = "Sorry to hear that. Would you like help getting it working, or would you rather send it back?"
REFUND_QUESTION = "Of course. Has the package reached you?"

Scenario = tuple[list[str], list[tuple[str, str]]]

SCENARIOS: dict[str, list[Scenario]] = {
    "billing": [
        (["I was charged twice for order {order}.", "My statement shows two payments of {amount} for one order."],
         [("I'm sorry about that. Do both charges show the same amount?", "Yes, both are {amount}, paid with {payment}."),
          ("Which payment method did you use?", "I used {payment}, and both charges are from the same day.")]),
        (["There is a charge of {amount} I don't recognise.", "My bank account shows a payment of {amount} to you."],
         [("Is there a matching order in your order history?", "No, I haven't ordered anything since {order}."),
          ("Which card or wallet was charged?", "It was {payment}, and I placed no order this month.")]),
        (["I need an invoice for order {order}.", "Could you send me a VAT invoice for my last purchase?"],
         [("Should the invoice show a company address?", "Yes, please use our office in {city}."),
          ("Which order is it for?", "Order {order}, I paid {amount} with {payment}.")]),
        (["My {payment} keeps getting declined at checkout.", "Payment fails every time I try to pay {amount}."],
         [("Has this payment method worked in our shop before?", "Yes, I paid with my {payment} last month."),
          ("Do you see an error message?", "It just says the payment failed, but my bank says it's fine.")]),
        (["The discount code was not applied to order {order}.", "I was charged shipping twice on order {order}."],
         [("Has the order arrived?", "Yes, it arrived fine, I just paid {amount} too much."),
          ("Do you still have the order confirmation?", "Yes, it shows {amount} more than it should.")]),
        (["I cancelled order {order} before it shipped but I was still charged.", "I cancelled my order, yet you took {amount}."],
         [("Did you get a cancellation email?", "Yes, but the {amount} was still taken via {payment}."),
          ("Which payment method was charged?", "It went to {payment}, two days after I cancelled.")]),
        (REFUND_OPENERS,
         [(REFUND_QUESTION, "Yes, it's fine, but I was charged {amount} twice."),
          (REFUND_QUESTION, "No, I cancelled it before it shipped, but my {payment} was still charged."),
          (REFUND_QUESTION, "Yes, and I'm keeping it, but the {amount} discount was never applied.")]),
    ],
    "shipping": [
        (["My order {order} was due last week and it's still not here.", "Where is my {product}? It's very late."],
         [("Which carrier shows on your tracking page?", "{carrier}, and tracking hasn't moved since {city}."),
          ("When did you place the order?", "Two weeks ago, and {carrier} shows no update.")]),
        (["{carrier} says my package was delivered, but I never got it.", "Order {order} shows as delivered, but it isn't here."],
         [("Could you check with your neighbours?", "I did, nobody in my building in {city} has it."),
          ("Was a photo or signature left as proof?", "No, {carrier} just marked it delivered.")]),
        (["Can I change the delivery address for order {order}?", "I need my {product} sent to a different address."],
         [("Has the order shipped yet?", "Not yet, I moved to {city} and need it sent there."),
          ("What is the new address?", "My new flat in {city}, it hasn't shipped yet.")]),
        (["Order {order} never arrived and I want a refund.", "My {product} never came, I want my {amount} back."],
         [("I'm sorry! Is the tracking still showing it in transit?", "Yes, {carrier} has had it stuck in {city} for ten days."),
          ("Did you get any message from the carrier?", "Only that {carrier} couldn't find the address.")]),
        (REFUND_OPENERS,
         [(REFUND_QUESTION, "No, it never arrived, {carrier} lost it somewhere near {city}."),
          (REFUND_QUESTION, "No, tracking says it's been waiting at a {carrier} depot for two weeks.")]),
    ],
    "technical": [
        (["My {product} won't turn on anymore.", "The {product} from order {order} is completely dead."],
         [("Have you charged it for an hour and held the power button?", "Yes, still nothing, not even a light."),
          ("Did it work at first?", "Yes, it worked for a week, then it stopped turning on.")]),
        (["I can't connect my {product} to the app.", "My {product} won't pair with my phone."],
         [("Is Bluetooth on, and which phone do you use?", "An Android phone, and Bluetooth is on."),
          ("Does the app find the device at all?", "No, it keeps searching and then times out.")]),
        (["The app crashes every time I open the settings of my {product}.", "Your app keeps closing when I open my {product}."],
         [("Did this start after the latest update?", "Yes, it started with yesterday's update."),
          ("Have you tried reinstalling it?", "Yes, twice, it still crashes with my {product}.")]),
        (["The update for my {product} got stuck halfway.", "My {product} froze during a firmware update."],
         [("Is the device still plugged in?", "Yes, it's been stuck at the same screen for an hour."),
          ("Can you restart it?", "Restarting brings me straight back to the frozen update.")]),
        (["I can't log in to the {product} app, it freezes on the loading screen."],
         [("Does it accept your password before it freezes?", "Yes, the password is accepted, then the screen freezes."),
          ("Does the website work for you?", "Yes, the website is fine, only the app freezes.")]),
        (TROUBLE_OPENERS,
         [(TROUBLE_QUESTION, "Help me fix it please, it keeps restarting."),
          (TROUBLE_QUESTION, "I'd like it working, the screen flickers all the time.")]),
    ],
    "account": [
        (["I forgot my password and the reset email never arrives.", "The verification code never comes, so I can't sign in."],
         [("Which email address is on the account?", "My work email, I'm {name} from {city}."),
          ("Have you checked your spam folder?", "Yes, nothing there, and I last ordered {order}.")]),
        (["My account got locked after too many login attempts.", "I'm locked out of my account, this is {name}."],
         [("Do you still have the phone number on the account?", "Yes, the same number as when I ordered {order}."),
          ("When did you last sign in?", "Last week, when I paid with {payment}.")]),
        (["How do I change the email address on my account?", "I want to update my name and address in my profile."],
         [("Can you still sign in?", "Yes, I can sign in, I just moved to {city}."),
          ("Is it for the account you used for order {order}?", "Yes, the same one, I'm {name}.")]),
        (["Please delete my account and my data.", "I'd like to close my account, this is {name}."],
         [("Do you have any open orders?", "No, my last order {order} is done."),
          ("Should we keep your invoices for tax reasons?", "No, please remove everything, I'm {name}.")]),
        (["Someone ordered from my account: I don't recognise order {order}.", "Someone changed my password and paid {amount}."],
         [("Did you get an email about a new sign-in?", "Yes, a sign-in from {city}, which wasn't me."),
          ("Do you still have access to your account?", "No, someone else signed in and changed my email.")]),
    ],
    "returns": [
        (["I received the wrong model of {product} in order {order}.", "The {product} I got is not the one I ordered."],
         [("Would you like an exchange or a refund?", "An exchange for the right model, please."),
          ("Is the item unused?", "Yes, still in the box, I'd like to swap it.")]),
        (["How do I get a return label for my {product}?", "I'd like to return the {product} from order {order}."],
         [("Is the item unused and in its box?", "Yes, I only opened it once."),
          ("What is the reason for the return?", "I don't need it anymore, I'm moving to {city}.")]),
        (["I sent back my {product} two weeks ago, where is my refund?", "My return of order {order} should be refunded by now."],
         [("Do you have the tracking number of the return?", "Yes, {carrier} delivered it to your warehouse on Monday."),
          ("How did you send it?", "With {carrier}, and I still haven't got my {amount}.")]),
        (["I changed my mind about the {product}, can I still return it?", "Can I send back order {order}? I don't need it."],
         [("When did you receive it?", "Five days ago, it's unopened."),
          ("Is it in its original packaging?", "Yes, I never used it, it cost {amount}.")]),
        (["My {product} arrived with a cracked screen.", "The box for order {order} was crushed and the {product} is broken."],
         [("Would you like a replacement or a refund?", "A replacement, please, I'll send this one back."),
          ("Can you send us a photo?", "Yes, and I want to return it for a new one.")]),
        (TROUBLE_OPENERS,
         [(TROUBLE_QUESTION, "I'd rather send it back for a refund."),
          (TROUBLE_QUESTION, "Send it back, please, I want a different model.")]),
        (REFUND_OPENERS,
         [(REFUND_QUESTION, "Yes, and I already sent it back with {carrier}."),
          (REFUND_QUESTION, "Yes, but it doesn't fit, I'd like to return it.")]),
    ],
}

GREETINGS = ["", "", "Hi, {name} here. ", "Hello, this is {name}. "]


# ---------------------------------------------------------------------------------------- splits


def _record(opener: str, question: str, answer: str, label: str) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                         {"role": "user", "content": opener},
                         {"role": "assistant", "content": question},
                         {"role": "user", "content": answer},
                         {"role": "assistant", "content": label}]}


def _render(scenario: Scenario, label: str, pools: dict[str, list[str]], rng: random.Random) -> dict:
    """One record of ``scenario``: a random opener, greeting, question/answer pair and entities."""
    openers, pairs = scenario
    values = {slot: rng.choice(pool) for slot, pool in pools.items()}
    greeting, opener = rng.choice(GREETINGS), rng.choice(openers)
    if "{name}" not in opener:  # no "Hi, Ben here. ... this is Ben."
        opener = greeting + opener
    question, answer = rng.choice(pairs)
    return _record(opener.format(**values), question, answer.format(**values), label)


def _label_records(label: str, n: int, split: str, rng: random.Random) -> list[dict]:
    """``n`` distinct records of ``label`` from ``split``'s entities, cycling through its scenarios."""
    pools = {slot: parts[split] for slot, parts in value_pools().items()}
    scenarios = list(SCENARIOS[label])
    rng.shuffle(scenarios)
    out: list[dict] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n:
            raise RuntimeError(f"cannot draw {n} distinct {label!r} examples from the {split} pools")
        record = _render(scenarios[len(out) % len(scenarios)], label, pools, rng)
        key = json.dumps(record)
        if key not in seen:
            seen.add(key)
            out.append(record)
    return out


def _split(n: int, split: str, rng: random.Random) -> list[dict]:
    """``n`` shuffled records, ``n // 5`` per label and the remainder on distinct random labels."""
    if n < len(LABELS):
        raise ValueError(f"need at least {len(LABELS)} examples per split (one per label), got {n}")
    extra = set(rng.sample(LABELS, n % len(LABELS)))
    rows: list[dict] = []
    for label in LABELS:
        rows.extend(_label_records(label, n // len(LABELS) + (label in extra), split, rng))
    rng.shuffle(rows)
    return rows


def make_splits(n_train: int = 300, n_test: int = 60, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Deterministic chat-format train/test records; classes balanced, test entities unseen in train."""
    rng = random.Random(seed)
    return _split(n_train, "train", rng), _split(n_test, "test", rng)


def label_of(record: dict) -> str:
    """The record's gold label (its final assistant turn)."""
    return record["messages"][-1]["content"]


def write_splits(directory: str | Path = HERE, n_train: int = 300, n_test: int = 60, seed: int = 0) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` into ``directory`` (atomically); return their paths."""
    return write_jsonl_splits(directory, *make_splits(n_train, n_test, seed))


if __name__ == "__main__":
    for p in write_splits():
        print(p)
