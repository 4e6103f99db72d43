#!/usr/bin/env ruby
# Log LLM calls to llmlogd over its Unix socket (NDJSON), with Ruby's standard library only.
require "io/wait"
require "json"
require "socket"

SOCKET = ENV.fetch("LLMLOGD_SOCKET", "/run/llmlogd/llmlogd.sock")

events = [
  { model: "gpt-4o", input: "What is 2+2?", output: "4", client: "ruby" },
  { model: "gpt-4o", input: "And 3+3?", output: "6", client: "ruby" },
]

UNIXSocket.open(SOCKET) do |s|
  events.each do |event|
    s.write(JSON.generate(event) + "\n") # one event per line
    line = s.wait_readable(30) && s.gets
    reply = line ? JSON.parse(line) : { "ok" => false, "error" => "no reply" }
    # The event was not stored; reply["error"] says why.
    abort "llmlogd refused the event: #{reply["error"]}" unless reply["ok"]
    puts "stored #{reply["id"]}"
  end
end
