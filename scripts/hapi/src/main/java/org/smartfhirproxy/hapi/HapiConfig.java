package org.smartfhirproxy.hapi;

import ca.uhn.fhir.batch2.jobs.config.Batch2JobsConfig;
import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.config.ThreadPoolFactoryConfig;
import ca.uhn.fhir.jpa.batch2.JpaBatch2Config;
import ca.uhn.fhir.jpa.config.HapiJpaConfig;
import ca.uhn.fhir.jpa.config.HibernatePropertiesProvider;
import ca.uhn.fhir.jpa.config.r4.JpaR4Config;
import ca.uhn.fhir.jpa.config.util.HapiEntityManagerFactoryUtil;
import ca.uhn.fhir.jpa.mdm.config.MdmConsumerConfig;
import ca.uhn.fhir.jpa.mdm.config.MdmSubmitterConfig;
import ca.uhn.fhir.jpa.model.config.PartitionSettings;
import ca.uhn.fhir.jpa.model.config.SubscriptionSettings;
import ca.uhn.fhir.jpa.model.dialect.HapiFhirH2Dialect;
import ca.uhn.fhir.jpa.search.DatabaseBackedPagingProvider;
import ca.uhn.fhir.jpa.searchparam.config.NicknameServiceConfig;
import ca.uhn.fhir.jpa.subscription.channel.config.SubscriptionChannelConfig;
import ca.uhn.fhir.jpa.subscription.match.config.SubscriptionProcessorConfig;
import ca.uhn.fhir.jpa.subscription.match.deliver.email.IEmailSender;
import ca.uhn.fhir.mdm.api.IMdmSettings;
import ca.uhn.fhir.mdm.api.MdmModeEnum;
import ca.uhn.fhir.mdm.rules.config.MdmRuleValidator;
import ca.uhn.fhir.mdm.rules.config.MdmSettings;
import jakarta.persistence.EntityManagerFactory;
import org.apache.commons.dbcp2.BasicDataSource;
import org.springframework.beans.factory.config.ConfigurableListableBeanFactory;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.context.annotation.Import;
import org.springframework.context.annotation.Primary;
import org.springframework.orm.jpa.JpaTransactionManager;
import org.springframework.orm.jpa.LocalContainerEntityManagerFactoryBean;
import org.springframework.transaction.annotation.EnableTransactionManagement;

import java.io.IOException;
import java.io.InputStream;
import java.nio.charset.StandardCharsets;
import java.util.HashSet;
import java.util.Properties;
import javax.sql.DataSource;

/**
 * Spring configuration of the HAPI FHIR JPA server (R4, H2). The {@link Options} bean is
 * registered by {@link Main} before the context is refreshed.
 */
@Configuration
@EnableTransactionManagement
@Import({
	JpaR4Config.class,
	HapiJpaConfig.class,
	ThreadPoolFactoryConfig.class,
	JpaBatch2Config.class,
	Batch2JobsConfig.class,
	SubscriptionChannelConfig.class,
	SubscriptionProcessorConfig.class,
	MdmConsumerConfig.class,
	MdmSubmitterConfig.class,
	NicknameServiceConfig.class
})
public class HapiConfig {

	@Bean
	public JpaStorageSettings jpaStorageSettings(Options theOptions) {
		JpaStorageSettings s = new JpaStorageSettings();
		// A test that writes and then searches must see its write at once.
		s.setReuseCachedSearchResultsForMillis(null);
		// Client-assigned ids such as p1 or obs-p1-glucose (ALPHANUMERIC is the default: no purely numeric ids).
		s.setResourceClientIdStrategy(JpaStorageSettings.ClientIdStrategyEnum.ALPHANUMERIC);
		// Test data may reference resources that do not exist (yet).
		s.setEnforceReferentialIntegrityOnWrite(false);
		s.setEnforceReferentialIntegrityOnDelete(false);
		s.setAutoCreatePlaceholderReferenceTargets(false);
		s.setAllowExternalReferences(true);
		// Absolute references to this server count as local ones (BASE/Patient/p1 == Patient/p1).
		s.setTreatBaseUrlsAsLocal(new HashSet<>(theOptions.localBases()));
		s.setDeleteEnabled(true);
		s.setAllowMultipleDelete(true);
		s.setExpungeEnabled(true);
		s.setDeleteExpungeEnabled(true);
		// Paging: page size limits live in the paging provider; allow fetching up to its maximum.
		s.setFetchSizeDefaultMaximum(Main.MAX_PAGE_SIZE);
		// No Lucene / Hibernate Search, no terminology work in the background.
		s.setAdvancedHSearchIndexing(false);
		s.setHibernateSearchIndexFullText(false);
		s.setHibernateSearchIndexSearchParams(false);
		s.setStoreResourceInHSearchIndex(false);
		s.setPreExpandValueSets(false);
		s.setEnableTaskPreExpandValueSets(false);
		s.setMarkResourcesForReindexingUponSearchParameterChange(false);
		return s;
	}

	@Bean
	public PartitionSettings partitionSettings() {
		return new PartitionSettings();
	}

	@Bean
	public SubscriptionSettings subscriptionSettings() {
		// HAPI's MDM module refuses to start without message subscriptions enabled. In MATCH_ONLY mode
		// it creates none, and without the subscription submitter no write is matched against any.
		SubscriptionSettings s = new SubscriptionSettings();
		s.addSupportedSubscriptionType(org.hl7.fhir.dstu2.model.Subscription.SubscriptionChannelType.MESSAGE);
		return s;
	}

	/** Required by the subscription processor that MDM pulls in; this server sends no e-mail. */
	@Bean
	public IEmailSender emailSender() {
		return theDetails -> {
			throw new UnsupportedOperationException("e-mail subscriptions are not supported");
		};
	}

	@Bean
	public DatabaseBackedPagingProvider databaseBackedPagingProvider() {
		DatabaseBackedPagingProvider p = new DatabaseBackedPagingProvider();
		p.setDefaultPageSize(Main.DEFAULT_PAGE_SIZE);
		p.setMaximumPageSize(Main.MAX_PAGE_SIZE);
		return p;
	}

	@Bean(destroyMethod = "close")
	public BasicDataSource dataSource(Options theOptions) {
		BasicDataSource ds = new BasicDataSource();
		ds.setDriver(new org.h2.Driver());
		ds.setUrl(theOptions.jdbcUrl());
		ds.setUsername("sa");
		ds.setPassword("");
		ds.setMaxTotal(20);
		ds.setMaxWait(java.time.Duration.ofSeconds(30));
		return ds;
	}

	@Primary
	@Bean
	public LocalContainerEntityManagerFactoryBean entityManagerFactory(
			ConfigurableListableBeanFactory theBeanFactory,
			FhirContext theFhirContext,
			JpaStorageSettings theStorageSettings,
			DataSource theDataSource) {
		LocalContainerEntityManagerFactoryBean emf =
				HapiEntityManagerFactoryUtil.newEntityManagerFactory(theBeanFactory, theFhirContext, theStorageSettings);
		emf.setPersistenceUnitName("HAPI_PU");
		emf.setDataSource(theDataSource);
		Properties p = new Properties();
		p.put("hibernate.dialect", HapiFhirH2Dialect.class.getName());
		p.put("hibernate.hbm2ddl.auto", "update");
		p.put("hibernate.format_sql", "false");
		p.put("hibernate.show_sql", "false");
		p.put("hibernate.jdbc.batch_size", "20");
		p.put("hibernate.cache.use_query_cache", "false");
		p.put("hibernate.cache.use_second_level_cache", "false");
		p.put("hibernate.cache.use_structured_entries", "false");
		p.put("hibernate.cache.use_minimal_puts", "false");
		p.put("hibernate.archive.scanner", "org.hibernate.boot.archive.scan.internal.DisabledScanner");
		p.put("hibernate.search.enabled", "false");
		// Hibernate's temporary tables for multi-table HQL mutations: HAPI runs none, and creating
		// them fails on H2 for one entity (duplicate column); skip them.
		p.put("hibernate.query.mutation_strategy.global_temporary.create_tables", "false");
		p.put("hibernate.query.mutation_strategy.persistent.create_tables", "false");
		emf.setJpaProperties(p);
		return emf;
	}

	@Primary
	@Bean
	public JpaTransactionManager transactionManager(EntityManagerFactory theEntityManagerFactory) {
		JpaTransactionManager tm = new JpaTransactionManager();
		tm.setEntityManagerFactory(theEntityManagerFactory);
		return tm;
	}

	@Primary
	@Bean
	public HibernatePropertiesProvider hibernatePropertiesProvider() {
		HibernatePropertiesProvider p = new HibernatePropertiesProvider();
		p.setDialectForUnitTest(new HapiFhirH2Dialect());
		return p;
	}

	/**
	 * HAPI MDM in MATCH_ONLY mode: Patient/$match scores candidates with the rules in
	 * mdm-rules.json; no golden resources, links or MDM subscriptions are created on write.
	 */
	@Bean
	public IMdmSettings mdmSettings(MdmRuleValidator theRuleValidator, Options theOptions) throws IOException {
		String json;
		try (InputStream in = HapiConfig.class.getResourceAsStream("/mdm-rules.json")) {
			json = new String(in.readAllBytes(), StandardCharsets.UTF_8);
		}
		MdmSettings settings = new MdmSettings(theRuleValidator).setEnabled(theOptions.mdm).setScriptText(json);
		settings.setMdmMode(MdmModeEnum.MATCH_ONLY);
		return settings;
	}
}
