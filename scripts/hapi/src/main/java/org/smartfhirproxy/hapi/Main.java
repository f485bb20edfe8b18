package org.smartfhirproxy.hapi;

import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.context.support.IValidationSupport;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.dao.IFhirSystemDao;
import ca.uhn.fhir.jpa.provider.JpaCapabilityStatementProvider;
import ca.uhn.fhir.jpa.provider.JpaSystemProvider;
import ca.uhn.fhir.jpa.search.DatabaseBackedPagingProvider;
import ca.uhn.fhir.narrative2.NullNarrativeGenerator;
import ca.uhn.fhir.rest.api.EncodingEnum;
import ca.uhn.fhir.rest.api.PreferHandlingEnum;
import ca.uhn.fhir.rest.server.HardcodedServerAddressStrategy;
import ca.uhn.fhir.rest.server.IncomingRequestAddressStrategy;
import ca.uhn.fhir.rest.server.RestfulServer;
import ca.uhn.fhir.rest.server.interceptor.SearchPreferHandlingInterceptor;
import ca.uhn.fhir.rest.server.provider.ResourceProviderFactory;
import ca.uhn.fhir.rest.server.util.ISearchParamRegistry;
import jakarta.servlet.DispatcherType;
import org.eclipse.jetty.ee10.servlet.FilterHolder;
import org.eclipse.jetty.ee10.servlet.ServletContextHandler;
import org.eclipse.jetty.ee10.servlet.ServletHolder;
import org.eclipse.jetty.server.HttpConfiguration;
import org.eclipse.jetty.server.HttpConnectionFactory;
import org.eclipse.jetty.server.Server;
import org.eclipse.jetty.server.ServerConnector;
import org.eclipse.jetty.util.thread.QueuedThreadPool;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.context.annotation.AnnotationConfigApplicationContext;

import java.util.EnumSet;

/**
 * HAPI FHIR JPA server (R4, H2) in embedded Jetty 12, FHIR base {@code /fhir}, bound to 127.0.0.1.
 * Prints {@code HAPI_READY <base>} on stdout once it serves.
 */
public final class Main {
	static final int DEFAULT_PAGE_SIZE = 20;
	static final int MAX_PAGE_SIZE = 1000;
	private static final Logger ourLog = LoggerFactory.getLogger(Main.class);

	public static void main(String[] args) throws Exception {
		long t0 = System.nanoTime();
		Options options;
		try {
			options = Options.parse(args);
		} catch (IllegalArgumentException e) {
			System.err.println(e.getMessage());
			System.exit(64);
			return;
		}

		AnnotationConfigApplicationContext ctx = new AnnotationConfigApplicationContext();
		ctx.registerBean(Options.class, () -> options);
		ctx.register(HapiConfig.class);
		ctx.refresh();
		ctx.registerShutdownHook();
		long tSpring = System.nanoTime();

		RestfulServer fhir = restfulServer(ctx, options);

		QueuedThreadPool threads = new QueuedThreadPool(64, 4);
		threads.setName("jetty");
		Server server = new Server(threads);
		HttpConfiguration http = new HttpConfiguration();
		http.setSendServerVersion(false);
		ServerConnector connector = new ServerConnector(server, new HttpConnectionFactory(http));
		connector.setHost("127.0.0.1");
		connector.setPort(options.port);
		server.addConnector(connector);

		ServletContextHandler context = new ServletContextHandler();
		context.setContextPath("/");
		if (options.accessLog != null) {
			context.addFilter(
					new FilterHolder(new AccessLogFilter(options.accessLog)),
					"/*",
					EnumSet.of(DispatcherType.REQUEST));
		}
		if (options.compartmentSearch) {
			// Stock HAPI JPA servers have no compartment search; only on request.
			context.addFilter(
					new FilterHolder(new CompartmentSearchFilter(
							ctx.getBean(FhirContext.class), ctx.getBean(ca.uhn.fhir.jpa.api.dao.DaoRegistry.class))),
					"/fhir/*",
					EnumSet.of(DispatcherType.REQUEST));
		}
		ServletHolder holder = new ServletHolder("fhir", fhir);
		holder.setInitOrder(1);
		context.addServlet(holder, "/fhir/*");
		server.setHandler(context);
		server.setStopAtShutdown(true);
		server.start();

		long tReady = System.nanoTime();
		String base = "http://127.0.0.1:" + connector.getLocalPort() + "/fhir";
		ourLog.info(
				"started in {} ms (Spring/HAPI {} ms, Jetty {} ms)",
				(tReady - t0) / 1_000_000,
				(tSpring - t0) / 1_000_000,
				(tReady - tSpring) / 1_000_000);
		System.out.println("HAPI_READY " + base);
		System.out.flush();
		server.join();
	}

	private static RestfulServer restfulServer(AnnotationConfigApplicationContext ctx, Options options) {
		FhirContext fhirContext = ctx.getBean(FhirContext.class);
		fhirContext.setNarrativeGenerator(new NullNarrativeGenerator());
		// Keep versioned references (Patient/p1/_history/1) as written; HAPI's parser strips the
		// version by default.
		fhirContext.getParserOptions().setStripVersionsFromReferences(false);
		IFhirSystemDao<?, ?> systemDao = ctx.getBean(IFhirSystemDao.class);
		JpaStorageSettings storageSettings = ctx.getBean(JpaStorageSettings.class);
		ISearchParamRegistry searchParamRegistry = ctx.getBean(ISearchParamRegistry.class);

		RestfulServer fhir = new RestfulServer(fhirContext);
		// Resource providers of every type, plus Patient/$match when MDM registered it (MdmLoader
		// adds its supplier on context refresh, so this runs after refresh).
		fhir.registerProviders(ctx.getBean(ResourceProviderFactory.class).createProviders());
		fhir.registerProvider(ctx.getBean(JpaSystemProvider.class));
		JpaCapabilityStatementProvider capabilities = new JpaCapabilityStatementProvider(
				fhir, systemDao, storageSettings, searchParamRegistry, ctx.getBean(IValidationSupport.class));
		capabilities.setImplementationDescription("HAPI FHIR R4 JPA server (smart-fhir-proxy tests)");
		fhir.setServerConformanceProvider(capabilities);
		fhir.setPagingProvider(ctx.getBean(DatabaseBackedPagingProvider.class));
		fhir.setDefaultResponseEncoding(EncodingEnum.JSON);
		fhir.setDefaultPrettyPrint(false);
		if (options.publicBase != null) {
			fhir.setServerAddressStrategy(new HardcodedServerAddressStrategy(options.publicBase));
		} else {
			fhir.setServerAddressStrategy(new IncomingRequestAddressStrategy());
		}
		// Unknown search parameters: 400 (HAPI's normal, strict behaviour); `Prefer: handling=lenient`
		// drops them instead, `handling=strict` keeps the 400.
		SearchPreferHandlingInterceptor prefer = new SearchPreferHandlingInterceptor(searchParamRegistry);
		prefer.setDefaultBehaviour(PreferHandlingEnum.STRICT);
		fhir.registerInterceptor(prefer);
		return fhir;
	}
}
