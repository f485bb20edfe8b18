package org.smartfhirproxy.hapi;

import java.util.ArrayList;
import java.util.List;

/** Command-line options of {@link Main}. */
public final class Options {
	public int port = -1;
	/** Base URL written into fullUrl, links and Location; null: derived from the request. */
	public String publicBase;
	/** Access log file; null: no access log. */
	public String accessLog;
	/** "mem" or "file:PATH" (PATH without the .mv.db suffix). */
	public String db = "mem";
	/** Turn Patient/$match (HAPI MDM, MATCH_ONLY mode) off. */
	public boolean mdm = true;
	/** Add compartment search (Patient/p1/Observation), which stock HAPI JPA servers lack. */
	public boolean compartmentSearch = false;

	static final String USAGE = "usage: Main --port P [--public-base URL] [--access-log FILE] [--db mem|file:PATH] [--no-mdm] [--compartment-search]";

	static Options parse(String[] args) {
		Options o = new Options();
		for (int i = 0; i < args.length; i++) {
			String a = args[i];
			switch (a) {
				case "--port" -> o.port = Integer.parseInt(value(args, ++i, a));
				case "--public-base" -> o.publicBase = stripSlash(value(args, ++i, a));
				case "--access-log" -> o.accessLog = value(args, ++i, a);
				case "--db" -> o.db = value(args, ++i, a);
				case "--no-mdm" -> o.mdm = false;
				case "--compartment-search" -> o.compartmentSearch = true;
				case "-h", "--help" -> throw new IllegalArgumentException(USAGE);
				default -> throw new IllegalArgumentException("unknown argument: " + a + "\n" + USAGE);
			}
		}
		if (o.port < 0 || o.port > 65535) {
			throw new IllegalArgumentException("--port is required\n" + USAGE);
		}
		if (!o.db.equals("mem") && !o.db.startsWith("file:")) {
			throw new IllegalArgumentException("--db must be mem or file:PATH\n" + USAGE);
		}
		return o;
	}

	/** The server's own base URL(s): references with these bases are local references. */
	public List<String> localBases() {
		List<String> bases = new ArrayList<>();
		bases.add("http://127.0.0.1:" + port + "/fhir");
		bases.add("http://localhost:" + port + "/fhir");
		if (publicBase != null && !bases.contains(publicBase)) {
			bases.add(publicBase);
		}
		return bases;
	}

	public String jdbcUrl() {
		if (db.equals("mem")) {
			return "jdbc:h2:mem:hapi;DB_CLOSE_DELAY=-1";
		}
		return "jdbc:h2:file:" + db.substring("file:".length());
	}

	private static String value(String[] args, int i, String flag) {
		if (i >= args.length) {
			throw new IllegalArgumentException(flag + " needs a value\n" + USAGE);
		}
		return args[i];
	}

	private static String stripSlash(String s) {
		return s.endsWith("/") ? s.substring(0, s.length() - 1) : s;
	}
}
