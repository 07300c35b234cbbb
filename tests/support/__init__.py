"""Test support shared by every suite: body builders and SSE reading.

``bodies`` builds what a model server answers (chat and text completions, chat
chunks, usage); ``sse`` frames and splits server-sent events and reads a
streamed answer as it arrives. The fake model server lives in ``tests/fakes``.
"""
