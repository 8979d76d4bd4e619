"""`histo serve`: the search page (archive, queries, results with matched tile pairs, Deep Zoom viewer)
and its JSON API, on Starlette + uvicorn. Needs the `serve` extra; nothing here is imported by
`histo --help` or by the rest of `search`.

Modules: query (the only caller of the search API), archive (slides by ID, files by key), images
(thumbnails, crops, Deep Zoom; disk cache), uploads (patch limits), jobs (background queries),
service (all of it, opened once), security (token, body limit, headers), render, app (the routes).
"""
