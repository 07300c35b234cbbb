"""The README's examples, verbatim, for the tests that send them."""

#: The README's full /llm/message example (its curl command's -H and -d).
README_HEADERS = {
    "Content-Type": "application/json",
    "X-Correlation-ID": "my-request-1",
}
README_BODY = """{
        "model": "qwen2.5-7b-instruct",
        "messages": [
          {"role": "system", "content": "Answer in one sentence."},
          {"role": "user", "content": "What is a gateway?"}
        ],
        "temperature": 0.7,
        "max_tokens": 150,
        "top_p": 0.9
      }"""
