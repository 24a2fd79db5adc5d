"""The Gradio demo of sparsecut (run it with `python app.py`).

- `demo.engine`: the chat engine: one shared model, chat sessions, error strings, costs.
- `demo.ui`: the layout and event wiring over a `demo.engine.ChatEngine`; `launch` serves it.
- `demo.uploads`: the request size limit and the upload folder's keeper (uploads deleted once answered).
- `demo.examples`: the example ShapesWorld scenes and questions in assets/examples/.
- `demo.hosting`: Hugging Face Spaces (ZeroGPU decorator, base LLM package).
"""
