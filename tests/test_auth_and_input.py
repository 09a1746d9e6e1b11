"""Who may call, and what every kind of bad request gets back: a clear 4xx, never a 500 or a hang."""

from __future__ import annotations

import json

import openai
import pytest

from conftest import http_request

HELLO = [{"role": "user", "content": "hi"}]


def test_missing_key_is_an_authentication_error(gateway):
    status, body = http_request(gateway.port, "POST", "/v1/chat/completions",
                                json.dumps({"model": "small", "messages": HELLO}).encode())
    assert status == 401 and body["error"]["code"] == "missing_api_key"


def test_wrong_key_is_an_authentication_error_that_does_not_echo_it(gateway):
    wrong = "sk-gw-this-is-not-a-key-at-all"
    with pytest.raises(openai.AuthenticationError) as caught:
        gateway.client(wrong).chat.completions.create(model="small", messages=HELLO)
    assert caught.value.code == "invalid_api_key"
    assert wrong not in caught.value.message and "sk-gw" not in caught.value.message
    with pytest.raises(openai.AuthenticationError):
        gateway.client(wrong).models.list()


def test_other_key_headers_clients_send(gateway, keys):
    for header in ("api-key", "x-api-key"):
        status, body = http_request(gateway.port, "POST", "/v1/chat/completions",
                                    json.dumps({"model": "small", "messages": HELLO}).encode(),
                                    {header: keys.acme, "Content-Type": "application/json"})
        assert status == 200, body


def test_expired_key_and_disabled_tenant(gateway, keys):
    with pytest.raises(openai.AuthenticationError) as caught:
        gateway.client(keys.expired).chat.completions.create(model="small", messages=HELLO)
    assert caught.value.code == "expired_api_key"
    with pytest.raises(openai.PermissionDeniedError) as caught:
        gateway.client(keys.disabled).chat.completions.create(model="small", messages=HELLO)
    assert caught.value.code == "tenant_disabled"


def test_keys_never_reach_the_log(gateway, keys, client):
    client.chat.completions.create(model="small", messages=HELLO)
    with pytest.raises(openai.AuthenticationError):
        gateway.client("sk-gw-wrong-key-in-log-check").models.list()
    text = gateway.log_path.read_text()
    assert keys.acme not in text and "sk-gw-wrong-key-in-log-check" not in text


def _post(gateway, keys, body: bytes, headers: dict | None = None):
    return http_request(gateway.port, "POST", "/v1/chat/completions", body,
                        {"Authorization": f"Bearer {keys.acme}", "Content-Type": "application/json", **(headers or {})})


@pytest.mark.parametrize(
    "body, param, words",
    [
        (b'{"model": "small", "messages": [', None, "not valid JSON"),
        (b"", None, "empty"),
        (b"[1, 2, 3]", None, "JSON object"),
        (b'"just a string"', None, "JSON object"),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', "model", "model"),
        (b'{"model": 42, "messages": [{"role": "user", "content": "hi"}]}', "model", "string"),
        (b'{"model": "small"}', "messages", "Missing required parameter"),
        (b'{"model": "small", "messages": "hi"}', "messages", "expected an array"),
        (b'{"model": "small", "messages": []}', "messages", "empty array"),
        (b'{"model": "small", "messages": ["hi"]}', "messages[0]", "expected an object"),
        (b'{"model": "small", "messages": [{"content": "hi"}]}', "messages[0].role", "Missing"),
        (b'{"model": "small", "messages": [{"role": "robot", "content": "hi"}]}', "messages[0].role", "robot"),
        (b'{"model": "small", "messages": [{"role": "user", "content": 7}]}', "messages[0].content", "content"),
        (b'{"model": "small", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}',
         "temperature", "a number"),
        (b'{"model": "small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}',
         "max_tokens", "an integer"),
        (b'{"model": "small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}',
         "max_tokens", ">= 1"),
        (b'{"model": "small", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}',
         "stream", "a boolean"),
        (b'{"model": "small", "messages": [{"role": "user", "content": "hi"}], "stream_options": {}}',
         "stream_options", "only allowed when 'stream' is enabled"),
        (b'{"model": "small", "messages": [{"role": "user", "content": "hi"}], "n": true}', "n", "an integer"),
        (b'{"model": "small", "messages": [{"role": "user", "content": "hi"}], "tools": {}}', "tools", "array"),
    ],
)
def test_bad_chat_body_gets_a_400_naming_the_problem(gateway, keys, body, param, words):
    status, answer = _post(gateway, keys, body)
    assert status == 400, answer
    error = answer["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert words in error["message"]


def test_bad_bodies_of_other_endpoints(gateway, keys):
    auth = {"Authorization": f"Bearer {keys.acme}"}
    status, body = http_request(gateway.port, "POST", "/v1/completions", b'{"model": "small"}', auth)
    assert status == 400 and body["error"]["param"] == "prompt"
    status, body = http_request(gateway.port, "POST", "/v1/completions",
                                b'{"model": "small", "prompt": {"x": 1}}', auth)
    assert status == 400 and body["error"]["param"] == "prompt"
    for prompt, param in ((b"[]", "prompt"), (b"[[]]", "prompt[0]"), (b"[[1, 2], []]", "prompt[1]")):
        status, body = http_request(gateway.port, "POST", "/v1/completions",
                                    b'{"model": "small", "prompt": ' + prompt + b'}', auth)
        assert status == 400 and body["error"]["code"] == "empty_array", (prompt, body)
        assert body["error"]["param"] == param and "empty array" in body["error"]["message"], (prompt, body)
    status, body = http_request(gateway.port, "POST", "/v1/embeddings", b'{"model": "embed"}', auth)
    assert status == 400 and body["error"]["param"] == "input"
    status, body = http_request(gateway.port, "POST", "/v1/embeddings",
                                b'{"model": "embed", "input": "x", "encoding_format": "hex"}', auth)
    assert status == 400 and body["error"]["param"] == "encoding_format"


def test_sdk_raises_bad_request_for_bad_types(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="small", messages=HELLO, extra_body={"top_p": "most"})
    assert caught.value.param == "top_p"


def test_body_over_the_limit_is_413(gateway, keys):
    padding = "x" * (17 * 1024 * 1024)  # the default limit is 16 MiB
    body = json.dumps({"model": "small", "messages": [{"role": "user", "content": padding}]}).encode()
    status, answer = _post(gateway, keys, body)
    assert status == 413 and answer["error"]["code"] == "request_too_large"


def test_body_over_the_limit_without_content_length_is_413(gateway, keys):
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    connection.putrequest("POST", "/v1/chat/completions")
    connection.putheader("Authorization", f"Bearer {keys.acme}")
    connection.putheader("Transfer-Encoding", "chunked")
    connection.endheaders()
    piece = b"x" * (1024 * 1024)
    try:
        for _ in range(18):
            connection.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        connection.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the gateway may answer and close before the client is done sending
    response = connection.getresponse()
    assert response.status == 413
    assert json.loads(response.read())["error"]["code"] == "request_too_large"
    connection.close()


def test_a_long_model_name_is_never_echoed_whole(gateway, keys):
    name = "m" * 5000
    headers = {"Authorization": f"Bearer {keys.acme}", "Content-Type": "application/json"}
    for method, path, body in (("POST", "/v1/chat/completions", {"model": name, "messages": [{"role": "user",
                                                                                              "content": "hi"}]}),
                               ("POST", "/v1/embeddings", {"model": name, "input": "hi"}),
                               ("GET", f"/v1/models/{name}", None)):
        status, error = http_request(gateway.port, method, path, json.dumps(body).encode() if body else None,
                                     headers)
        assert status == 404 and len(error["error"]["message"]) < 400, (path, len(error["error"]["message"]))
