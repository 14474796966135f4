// Parses each PromQL query (JSON list on stdin) with Prometheus' own grammar; prints JSON:
// one entry per query, null when it parses, else where the first syntax error is.
import { readFileSync } from "node:fs";
import { parser } from "@prometheus-io/lezer-promql";

const queries = JSON.parse(readFileSync(0, "utf8"));
const results = queries.map((query) => {
  let error = null;
  parser.parse(query).iterate({
    enter(node) {
      if (error === null && node.type.isError) {
        error = { at: node.from, near: query.slice(Math.max(0, node.from - 20), node.from + 20) };
      }
    },
  });
  return error;
});
process.stdout.write(JSON.stringify(results));
