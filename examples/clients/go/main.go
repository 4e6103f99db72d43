// Log LLM calls to llmlogd over its Unix socket (NDJSON), with Go's standard library only.
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"time"
)

type reply struct {
	OK    bool   `json:"ok"`
	ID    string `json:"id"`
	Error string `json:"error"`
}

func main() {
	socket := os.Getenv("LLMLOGD_SOCKET")
	if socket == "" {
		socket = "/run/llmlogd/llmlogd.sock"
	}
	events := []map[string]any{
		{"model": "gpt-4o", "input": "What is 2+2?", "output": "4", "client": "go"},
		{"model": "gpt-4o", "input": "And 3+3?", "output": "6", "client": "go"},
	}

	conn, err := net.Dial("unix", socket)
	if err != nil {
		fmt.Fprintln(os.Stderr, "llmlogd:", err)
		os.Exit(1)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	replies := bufio.NewScanner(conn)
	for _, event := range events {
		line, _ := json.Marshal(event)
		if _, err := conn.Write(append(line, '\n')); err != nil { // one event per line
			fmt.Fprintln(os.Stderr, "llmlogd:", err)
			os.Exit(1)
		}
		var r reply
		if !replies.Scan() {
			r.Error = fmt.Sprint("no reply: ", replies.Err())
		} else if err := json.Unmarshal(replies.Bytes(), &r); err != nil {
			r.Error = err.Error()
		}
		if !r.OK { // the event was not stored; r.Error says why
			fmt.Fprintln(os.Stderr, "llmlogd refused the event:", r.Error)
			os.Exit(1)
		}
		fmt.Println("stored", r.ID)
	}
}
