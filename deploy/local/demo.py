"""Send one chat request through the gateway with the openai SDK; print the answer and headers."""

from __future__ import annotations

import argparse

import openai


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    parser.add_argument("--api-key", default="sk-tollway-local-demo")
    parser.add_argument("--model", default="auto")
    parser.add_argument("--prompt", default="In one sentence, what does a toll road charge for?")
    args = parser.parse_args()

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=1)
    raw = client.chat.completions.with_raw_response.create(
        model=args.model,
        messages=[{"role": "user", "content": args.prompt}],
        max_tokens=48,
        temperature=0,
    )
    completion = raw.parse()
    print(f"prompt : {args.prompt}")
    print(f"answer : {completion.choices[0].message.content!r}")
    print(f"model  : {completion.model} (finish_reason={completion.choices[0].finish_reason})")
    if completion.usage is not None:
        usage = completion.usage
        tokens = f"{usage.prompt_tokens} prompt + {usage.completion_tokens} completion"
        print(f"usage  : {tokens} tokens")
    print("headers:")
    for name, value in sorted(raw.headers.items()):
        if name.startswith("x-tollway-") or name == "x-request-id":
            print(f"  {name}: {value}")


if __name__ == "__main__":
    main()
