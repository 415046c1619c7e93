"""Conversations in OpenAI form for the chat-format tests: `OFFICIAL` are ones the official Hermes 3
templates render without losing content; `DEVIATIONS` are ones where hermes departs from them (each named
in hermes.data.chat's docstring). Each entry: (name, messages, tools or None)."""

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "  The city name. "},
                "unit": {"type": "string", "enum": ["c", "f"], "description": "Unit."},
            },
            "required": ["city"],
        },
    },
}
TIME = {
    "name": "get_time",
    "description": "Local time of a city, as HH:MM.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    "return": {"type": "string", "description": "The time."},
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search documents; returns ids with scores.",
        "parameters": {
            "type": "object",
            "properties": {
                "terms": {"type": "array", "items": {"type": "string"}, "description": "Search terms."},
                "limit": {"type": ["integer", "string"], "description": "How many."},
                "weights": {"type": "object", "additionalProperties": {"type": "number"}},
                "filters": {"type": "object", "description": "Any filters."},
                "exact": {"type": "boolean"},
                "anything": {"description": "No type at all."},
                "ratio": {"type": "number", "description": "A float."},
            },
        },
    },
}
NO_ARGS = {"type": "function", "function": {"name": "now", "description": "The time now.", "parameters": {}}}


def call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def tool(text, **extra):
    return {"role": "tool", "content": text, **extra}


def calls(*tool_calls):
    return {"role": "assistant", "content": None, "tool_calls": list(tool_calls)}


OFFICIAL = [
    ("plain", [system("You are Hermes."), user("Hi"), assistant("Hello! How can I help?")], None),
    ("no system prompt", [user("What is 6 * 7?"), assistant("42")], None),
    (
        "multi-turn without system",
        [
            user("Hi"),
            assistant("Hello."),
            user("Tell me a joke."),
            assistant("Why did the GPU cross the road?"),
        ],
        None,
    ),
    ("generation prompt", [user("Name a prime.")], None),
    ("generation prompt with system", [system("Answer in French."), user("Hello")], None),
    ("unicode", [user("Ça va? 你好 🙂 مرحبا"), assistant("Très bien — 谢谢! 🚀 straße")], None),
    (
        "whitespace and newlines",
        [user("  line one\n\n\tline two  "), assistant("\n\nA reply that starts with blank lines.\n  ")],
        None,
    ),
    ("reasoning tags", [user("2+2?"), assistant("<SCRATCHPAD>Add them.</SCRATCHPAD>\n4")], None),
    ("system only and user", [system(""), user("Empty system prompt above.")], None),
    (
        "tool call with dict arguments",
        [
            user("Weather in Oslo?"),
            calls(call("get_weather", {"city": "Oslo", "unit": "c"})),
            tool('{"temp_c": 3}'),
            assistant("It is 3 °C in Oslo."),
        ],
        [WEATHER],
    ),
    (
        "tool call with string arguments kept byte for byte",
        [
            user("Weather in Lima?"),
            calls(call("get_weather", '{"city":"Lima" , "unit":"f"}')),
            tool("{'temp_f': 70}"),
            assistant("70 °F."),
        ],
        [WEATHER],
    ),
    (
        "several calls and several results",
        [
            user("Weather and time in Tokyo?"),
            calls(call("get_weather", {"city": "Tokyo"}), call("get_time", '{"city": "Tokyo"}')),
            tool('{"temp_c": 21}', tool_call_id="a"),
            tool('"14:05"', name="get_time"),
            assistant("21 °C and 14:05 in Tokyo."),
        ],
        [WEATHER, TIME],
    ),
    (
        "own system prompt beside tools",
        [
            system("You are a terse weather bot."),
            user("Paris?"),
            calls(call("get_weather", {"city": "Paris"})),
            tool("18"),
            assistant("18 °C."),
        ],
        [WEATHER],
    ),
    (
        "tool results then generation prompt",
        [user("Weather in Rome?"), calls(call("get_weather", {"city": "Rome"})), tool('{"temp_c": 25}')],
        [WEATHER],
    ),
    ("tools offered, none called", [user("Say hi."), assistant("Hi!")], [WEATHER, TIME]),
    (
        "every parameter type",
        [user("Find llama docs."), calls(call("search", {"terms": ["llama"], "limit": 3})), tool("[]")],
        [SEARCH],
    ),
    (
        "tool without parameters",
        [user("Time?"), calls(call("now", {})), tool("noon"), assistant("Noon.")],
        [NO_ARGS],
    ),
    (
        "unicode in arguments and results",
        [
            user("Wetter in Zürich?"),
            calls(call("get_weather", {"city": "Zürich", "note": "naïve ☂"})),
            tool('{"état": "pluie 🌧"}'),
            assistant("Es regnet."),
        ],
        [WEATHER],
    ),
    (
        "two rounds of calls",
        [
            system("Use tools."),
            user("Oslo then Lima."),
            calls(call("get_weather", {"city": "Oslo"})),
            tool("3"),
            calls(call("get_weather", {"city": "Lima"})),
            tool("22"),
            assistant("Oslo 3, Lima 22."),
            user("Thanks"),
            assistant("You are welcome."),
        ],
        [WEATHER],
    ),
    (
        "nested arguments",
        [
            user("Search with weights."),
            calls(
                call(
                    "search",
                    {"terms": ["a", "b"], "weights": {"a": 1.5, "b": 0}, "filters": {"x": [1, {"y": None}]}},
                )
            ),
            tool('{"ids": [1, 2]}'),
            assistant("Found 1 and 2."),
        ],
        [SEARCH],
    ),
    (
        "pre-rendered tool call text",
        [
            user("Weather?"),
            assistant('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'),
        ],
        [WEATHER],
    ),
]

DEVIATIONS = [
    (
        "text beside a tool call",
        [
            user("Weather in Oslo?"),
            {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [call("get_weather", {"city": "Oslo"})],
            },
            tool("3"),
            assistant("3 °C."),
        ],
        [WEATHER],
    ),
    (
        "tool calls without tools",
        [user("Weather?"), calls(call("get_weather", {"city": "Oslo"})), tool("3"), assistant("3 °C.")],
        None,
    ),
    ("call without arguments", [user("Ping"), calls({"function": {"name": "ping"}}), tool("pong")], None),
    (
        "tool without description and an unknown type",
        [user("Go"), assistant("Going.")],
        [
            {
                "name": "go",
                "parameters": {"properties": {"when": {"type": "null"}, "who": {"type": ["string", "null"]}}},
            }
        ],
    ),
]
