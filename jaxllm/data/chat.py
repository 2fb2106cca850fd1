"""Chat template: a conversation -> token ids and a per-token loss mask.

A conversation is a list of messages {"role": "system" | "user" | "assistant", "content": str}.
The default template renders each message as

    <|role|> "\n" content <|end|> "\n"

and a conversation as the concatenation of its messages, with no BOS or EOS, e.g.

    <|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n

The loss mask is 1 on the tokens the model should learn to write: an assistant message's content and
its <|end|> (the model ends its own turn; generation stops at <|end|>). Everything else, i.e. system
and user messages, every role marker and every newline, gets `prompt_loss_weight` (0 = masked SFT,
1 = plain LM loss on every token). Padding is added later by the pipeline and always has mask 0.

Each piece (marker, newline, content, end) is tokenized on its own and the ids are concatenated,
so mask boundaries are exact. Rendering is prefix-stable: the ids of messages[:k] are a prefix of the
ids of messages, and `render_prompt` (the conversation + "<|assistant|>\n") is a prefix of the
conversation with the next assistant message appended.
"""

import dataclasses

from jaxllm.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """The strings of a chat template; the four markers must be single tokens of the tokenizer."""
  system: str = "<|system|>"      # marker that opens a system message
  user: str = "<|user|>"          # marker that opens a user message
  assistant: str = "<|assistant|>"  # marker that opens an assistant message
  end: str = "<|end|>"            # closes every message; learned (mask 1) after assistant content
  after_marker: str = "\n"        # between the role marker and the content
  after_end: str = "\n"           # after <|end|>, before the next message

  @property
  def markers(self) -> tuple[str, ...]:
    return (self.system, self.user, self.assistant, self.end)

  def marker(self, role: str) -> str:
    return {"system": self.system, "user": self.user, "assistant": self.assistant}[role]


DEFAULT_TEMPLATE = ChatTemplate()


def from_pair(prompt: str, response: str) -> list[dict]:
  """A prompt/response pair as a conversation: [user: prompt, assistant: response]."""
  return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def check_messages(messages) -> None:
  """Raises ValueError unless `messages` is a non-empty list of {"role": known role, "content": str}."""
  if not isinstance(messages, list) or not messages:
    raise ValueError("a conversation must be a non-empty list of messages")
  for i, message in enumerate(messages):
    if not isinstance(message, dict):
      raise ValueError(f"message {i} is not an object: {message!r:.80}")
    if message.get("role") not in ROLES:
      raise ValueError(f"message {i} has unknown role {message.get('role')!r} (expected one of {ROLES})")
    if not isinstance(message.get("content"), str):
      raise ValueError(f"message {i} has no string 'content'")


def check_tokenizer(tokenizer: Tokenizer, template: ChatTemplate = DEFAULT_TEMPLATE) -> dict[str, int]:
  """{marker: id} for the template's markers; ValueError naming a marker that is not a single token. A tokenizer
  with its own chat template (a Hugging Face one): {} once the template renders a conversation."""
  if tokenizer.chat_template:
    _render_own(from_pair("Hi", "Hello"), tokenizer, 0.0)
    return {}
  ids = {}
  for marker in template.markers:
    try:
      token = tokenizer.token_id(marker)
    except KeyError:
      token = None
    if token is None or tokenizer.encode(marker) != [token]:
      raise ValueError(
          f"the tokenizer has no single token for the chat marker {marker!r} (it encodes to "
          f"{len(tokenizer.encode(marker))} pieces); train it with {marker!r} in special_tokens")
    ids[marker] = token
  return ids


def render_text(messages: list[dict], template: ChatTemplate = DEFAULT_TEMPLATE) -> str:
  """The text that `render` tokenizes (decode(render(...)[0]) equals it)."""
  return "".join(f"{template.marker(m['role'])}{template.after_marker}{m['content']}{template.end}"
                 f"{template.after_end}" for m in messages)


def render(messages: list[dict], tokenizer: Tokenizer, template: ChatTemplate = DEFAULT_TEMPLATE,
           *, prompt_loss_weight: float = 0.0) -> tuple[list[int], list[float]]:
  """(ids, loss_mask) of a conversation: mask 1 on assistant content and its <|end|>, else the weight."""
  if not 0.0 <= prompt_loss_weight <= 1.0:
    raise ValueError(f"prompt_loss_weight must be in [0, 1], got {prompt_loss_weight}")
  check_messages(messages)
  if tokenizer.chat_template:
    return _render_own(messages, tokenizer, prompt_loss_weight)
  marker_ids = check_tokenizer(tokenizer, template)
  after_marker, after_end = tokenizer.encode(template.after_marker), tokenizer.encode(template.after_end)
  w = float(prompt_loss_weight)
  ids, mask = [], []

  def add(piece: list[int], weight: float):
    ids.extend(piece)
    mask.extend([weight] * len(piece))

  for m in messages:
    answer = 1.0 if m["role"] == "assistant" else w
    add([marker_ids[template.marker(m["role"])]] + after_marker, w)
    add(tokenizer.encode(m["content"]), answer)
    add([marker_ids[template.end]], answer)
    add(after_end, w)
  return ids, mask


def _render_own(messages: list[dict], tokenizer, weight: float) -> tuple[list[int], list[float]]:
  """`render` through the tokenizer's own chat template: the text the template writes, the loss on each
  assistant turn's span (its content and whatever the template closes it with, e.g. "<|im_end|>\\n"): the text
  the template adds between the conversation so far with the generation prompt and the conversation with that
  turn. Each span is tokenized on its own, so mask boundaries are exact; the template must be prefix-stable."""
  ids, mask, done = [], [], ""
  for k, m in enumerate(messages):
    pieces = [(tokenizer.render_chat(messages[:k], add_generation_prompt=True), weight)] if m["role"] == "assistant" \
        else []
    pieces.append((tokenizer.render_chat(messages[:k + 1]), 1.0 if m["role"] == "assistant" else weight))
    for text, w in pieces:
      if not text.startswith(done):
        raise ValueError("the tokenizer's chat template is not prefix-stable (rendering more messages changes the "
                         "text of earlier ones), so the loss spans of its turns cannot be told apart")
      piece = tokenizer.encode(text[len(done):])
      ids, mask, done = ids + piece, mask + [w] * len(piece), text
  return ids, mask


def render_answer(prompt: list[dict], answer: str, tokenizer: Tokenizer,
                  template: ChatTemplate = DEFAULT_TEMPLATE) -> tuple[list[int], list[float]]:
  """(ids, loss mask) of an assistant answer as it follows `render_prompt(prompt)`: render(prompt + [answer]) is
  render_prompt(prompt)'s ids followed by these."""
  if tokenizer.chat_template:
    ids, mask = _render_own(prompt + [{"role": "assistant", "content": answer}], tokenizer, 0.0)
    head = len(render_prompt(prompt, tokenizer))
    return ids[head:], mask[head:]
  ids, mask = render([{"role": "assistant", "content": answer}], tokenizer, template)
  head = mask.index(1.0)  # the "<|assistant|>\\n" that the prompt's ids already end with
  return ids[head:], mask[head:]


def stop_ids(tokenizer: Tokenizer, template: ChatTemplate = DEFAULT_TEMPLATE) -> list[int]:
  """The ids that end an answer: EOS and the template's end of turn (<|end|>; with a tokenizer's own template the
  end-of-turn tokens of known families present in its vocabulary: <|im_end|>, <|eot_id|>, <|end|>)."""
  ends = ["<|im_end|>", "<|eot_id|>", "<|end|>"] if tokenizer.chat_template else [template.end]
  out = [tokenizer.eos_id]
  for end in ends:
    try:
      out.append(tokenizer.token_id(end))
    except KeyError:
      if not tokenizer.chat_template:
        raise
  return list(dict.fromkeys(out))


def render_prompt(messages: list[dict], tokenizer: Tokenizer,
                  template: ChatTemplate = DEFAULT_TEMPLATE) -> list[int]:
  """Ids of `messages` followed by "<|assistant|>\\n": what a model continues to answer."""
  if tokenizer.chat_template:
    check_messages(messages)
    return _render_own(messages, tokenizer, 0.0)[0] + tokenizer.encode(
        tokenizer.render_chat(messages, add_generation_prompt=True)[len(tokenizer.render_chat(messages)):])
  ids, _ = render(messages, tokenizer, template)
  return ids + [check_tokenizer(tokenizer, template)[template.assistant]] + tokenizer.encode(
      template.after_marker)
