#!/bin/sh
# SillyTavern's first start in the compose stack: its default user talks to the gateway (Chat Completion, custom
# OpenAI-compatible source, the router alias "auto") with the tenant key from SILLYTAVERN_GATEWAY_KEY. Files the
# user has already changed are left alone.
set -eu
user_dir=/home/node/app/data/default-user
mkdir -p "$user_dir"
if [ ! -f "$user_dir/secrets.json" ]; then
  printf '{"api_key_custom": "%s"}\n' "$SILLYTAVERN_GATEWAY_KEY" > "$user_dir/secrets.json"
fi
if [ ! -f "$user_dir/settings.json" ]; then
  cat > "$user_dir/settings.json" <<JSON
{"main_api": "openai",
 "oai_settings": {"chat_completion_source": "custom", "custom_url": "$GATEWAY_URL", "custom_model": "auto",
                  "stream_openai": true}}
JSON
fi
exec ./docker-entrypoint.sh "$@"
