"""Behaviour-aware history rendering and the prompt templates of every training task.

History (docs/method.md "The generative model and its tasks"): a user's earlier events in time order, both behaviours interleaved;
a recommendation click is written `<rec_item>` + collaborative ID, a search `<src_query>` + query
text, then `<src_item>` + semantic ID of the clicked item. At most `max_rec` recommendation clicks
and `max_search` searches (the most recent ones) are kept.

Targets:
    rec    `<rec_item><a_3><b_7><c_5><d_2>`    (collaborative ID: the recommendation need)
    search `<src_item><a_3><b_7><s_1><t_0>`    (semantic ID: the search need)
    query  `<src_query> action crime drama`
    adhoc  `<src_item>` + semantic ID         (same target form as `search`)
    align  the bare semantic / collaborative ID, or the item's title

Templates are plain `str.format` strings; the placeholders are {history}, {query}, {text},
{title} and {id}. Template 0 of each task (and variant) is the one validation examples use.
"""
from __future__ import annotations

from typing import Iterable, Mapping, NamedTuple

from gensar_core.model.vocab import REC_ITEM, SRC_ITEM, SRC_QUERY

EMPTY_HISTORY = "(none)"


class ItemIds(NamedTuple):
    semantic_id: str
    collaborative_id: str


def rec_target(ids: ItemIds) -> str:
    return REC_ITEM + ids.collaborative_id


def search_target(ids: ItemIds) -> str:
    return SRC_ITEM + ids.semantic_id


def query_target(query: str) -> str:
    return f"{SRC_QUERY} {query.strip()}"


def select_history(history: Iterable[Mapping], max_rec: int = 5, max_search: int = 5) -> list[Mapping]:
    """The last `max_rec` rec events and last `max_search` searches, in their time order."""
    events = list(history) if history is not None else []
    rec_pos = [i for i, e in enumerate(events) if e["behavior"] == "rec"]
    src_pos = [i for i, e in enumerate(events) if e["behavior"] == "search"]
    keep = set(rec_pos[len(rec_pos) - max_rec:] if max_rec else []) | \
        set(src_pos[len(src_pos) - max_search:] if max_search else [])
    return [e for i, e in enumerate(events) if i in keep]


def render_event(event: Mapping, ids: ItemIds) -> str:
    if event["behavior"] == "rec":
        return rec_target(ids)
    if event["behavior"] == "search":
        query = event.get("query") or ""
        return f"{SRC_QUERY} {query.strip()} {SRC_ITEM}{ids.semantic_id}"
    raise ValueError(f"unknown behaviour {event['behavior']!r}")


def render_history(history: Iterable[Mapping], item_ids: Mapping[str, ItemIds],
                   max_rec: int = 5, max_search: int = 5) -> str:
    """History events -> one line of text, oldest first; `(none)` for an empty history."""
    parts = []
    for event in select_history(history, max_rec, max_search):
        ids = item_ids.get(str(event["item_id"]))
        if ids is None:
            raise KeyError(f"history item {event['item_id']!r} has no identifier in identifiers/items")
        parts.append(render_event(event, ids))
    return " ".join(parts) if parts else EMPTY_HISTORY


# ---------------------------------------------------------------- templates
REC_TEMPLATES = [
    "User history: {history}. Recommend the next item for this user.",
    "Here is what the user did recently: {history}. What will the user click next in the recommendation feed?",
    "Given the interaction history {history}, predict the next recommended item.",
    "{history} Based on these interactions, which item should be recommended next?",
    "A user has the following activity: {history}. Suggest one item the user will like.",
    "Recent behaviour of the user: {history}. Predict the next item from the recommendation feed.",
    "Recommend an item. History: {history}",
    "The user's search and browsing history is {history}. Which item will the user click next on the home feed?",
    "Using the sequence {history}, generate the collaborative identifier of the next recommended item.",
    "Predict what this user clicks next without searching. History: {history}.",
]

SEARCH_TEMPLATES = [
    "User history: {history}. The user searches for \"{query}\". Which item will the user click?",
    "Given the history {history} and the search query {query}, retrieve the item the user wants.",
    "Search query: {query}. User history: {history}. Find the relevant item.",
    "A user with history {history} types \"{query}\" into the search box. Predict the clicked item.",
    "{history} Now the user searches: {query}. Which item matches?",
    "Personalised search. Query: {query}. Past behaviour: {history}.",
    "Find the item for the query \"{query}\", considering the user's history {history}.",
    "The user has done {history}. The user now looks for {query}. Return the item.",
    "Retrieve the item this user clicks after searching {query}. History: {history}",
    "Query: {query} | History: {history} | Generate the semantic identifier of the clicked item.",
]

QUERY_TEMPLATES = [
    "User history: {history}. What will the user search for next?",
    "Given the interaction history {history}, predict the user's next search query.",
    "{history} Which query will this user type next?",
    "Recent behaviour of the user: {history}. Generate the next search query.",
    "A user has the following activity: {history}. Guess what the user searches for next.",
    "Predict the next search. History: {history}",
    "The user's search and browsing history is {history}. Write the query the user will enter next.",
    "Based on {history}, what is the user's next information need? Give the search query.",
    "Complete the user's next search query. History: {history}.",
    "History: {history} | Next query?",
]

ADHOC_TEMPLATES = [
    "Search query: {query}. Find the relevant item.",
    "Which item matches the query \"{query}\"?",
    "A user searches for {query}. Retrieve the item.",
    "Find an item for: {query}",
    "Retrieve the item that best answers the search \"{query}\".",
    "Query: {query}. Generate the semantic identifier of the matching item.",
    "Someone types \"{query}\" into the search box. Which item do they want?",
    "Search for {query}.",
    "Return the item relevant to this query: {query}",
    "Given only the query {query} and no history, predict the clicked item.",
]

ALIGN_TEMPLATES = {
    # item text -> semantic ID
    "text2sem": [
        "Item: {text}. What is its semantic identifier?",
        "Give the semantic ID of this item: {text}",
        "Semantic identifier for \"{text}\"?",
        "Describe the item {text} with its semantic ID.",
        "Map the item description to its semantic identifier: {text}",
    ],
    # item text -> collaborative ID
    "text2col": [
        "Item: {text}. What is its collaborative identifier?",
        "Give the collaborative ID of this item: {text}",
        "Collaborative identifier for \"{text}\"?",
        "Which collaborative ID does the item {text} have?",
        "Map the item description to its collaborative identifier: {text}",
    ],
    # semantic ID -> title
    "sem2title": [
        "What is the title of the item with semantic ID {id}?",
        "Semantic ID {id}: give the item's title.",
        "Which item is {id}? Answer with its title.",
        "Name the item whose semantic identifier is {id}.",
        "Translate the semantic identifier {id} into the item title.",
    ],
    # collaborative ID -> title
    "col2title": [
        "What is the title of the item with collaborative ID {id}?",
        "Collaborative ID {id}: give the item's title.",
        "Which item is {id}? Give its name.",
        "Name the item whose collaborative identifier is {id}.",
        "Translate the collaborative identifier {id} into the item title.",
    ],
}

TEMPLATES: dict[str, list[str] | dict[str, list[str]]] = {
    "rec": REC_TEMPLATES,
    "search": SEARCH_TEMPLATES,
    "query": QUERY_TEMPLATES,
    "adhoc": ADHOC_TEMPLATES,
    "align": ALIGN_TEMPLATES,
}


def templates(task: str, variant: str | None = None) -> list[str]:
    table = TEMPLATES[task]
    if isinstance(table, dict):
        if variant is None:
            raise ValueError(f"task {task!r} needs a variant, one of {list(table)}")
        return table[variant]
    return table


def fill(template: str, **values: str) -> str:
    return template.format(**values)
